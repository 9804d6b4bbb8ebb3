"""The KnowFREE pipeline on one config, as a Ray job: the command users run first.

    python -m jobs.pipeline --config configs/demo-pipeline.yaml            # or: knowfree pipeline ...
    python -m jobs.pipeline --config configs/pipeline-weibo-250.yaml --variant F

Variants of one training subset (one *cell*):

``F`` (paper: KnowFREE-F, pipeline 1)
    the training sentences → ``jobs.annotate`` (extension labels) → ``jobs.merge_labels``
    (synonym labels merged) → training on the fused samples → dev/test evaluation.
``FS`` (KnowFREE-FS, pipelines 1 and 2)
    F, then ``jobs.synthesize``: an LLM continues and explains each training sentence, the
    frozen F model labels the target entities of the synthetic sentences, ``jobs.annotate``
    adds their extension labels (renamed by F's label map), and KnowFREE is trained again on
    the fused plus the synthetic samples, the latter weighted by ``model.beta``.
``FU`` (self-training; not in the paper)
    F, then its frozen model labels an unlabelled in-domain pool (``unlabeled.input``) through
    ``jobs.predict``; the sentences it is sure of (``unlabeled.rule``,
    knowfree_core.self_training) get their extension labels from ``jobs.annotate`` (renamed by
    F's label map), and KnowFREE is trained again on the fused plus these pseudo-labelled
    samples, the latter weighted by ``model.beta_unlabeled``. ``unlabeled.rounds: N`` labels
    the pool again with each newer model. ``FSU``: FS's synthetic samples and FU's pool together.
``noext``, ``biaffine``
    the ablations: no extension labels; and no local attention either.
``F-noent``, ``F-nopos``, ``F-nomerge``, ``F-cnn``
    the ablations of the paper's Table 3: F without entity (or POS) extension labels, without
    synonym merging, and with a 2-D CNN in place of the local attention.

Each stage writes its own folder in the cell's folder and is skipped when its output is
there, so a rerun after a crash continues with the stage that was interrupted (annotation,
synthesis and training also resume inside the stage):

    cell/
      train_subset.jsonl   the sampled training sentences
      annotate/ merge/     pipeline 1 on them (label_map.json, merged.jsonl)
      train/               the F model (run folder of knowfree train)
      synthesize/          synthetic.jsonl, labeled/labeled.jsonl, answers.sqlite
      synthetic_annotate/  extension labels of the synthetic sentences
      train_fs_data.jsonl  fused + synthetic samples (synthetic ones flagged)
      predict_unlabeled/   the pool labelled by F's model (jobs.predict; _r2 ... for later rounds)
      pseudo.jsonl pseudo_annotate/   the kept pseudo-labelled sentences and their extension labels
      train_fu_data.jsonl train_fu/   fused + pseudo samples, and FU's model (train_fu_r2 ...)
      train_fs/ train_noext/ train_biaffine/
      cell.json            every stage's summary and the scores

Grid mode (``grid.k_shot`` or ``grid.subset_sizes`` with ``grid.seeds``) runs one cell per
(size, seed) under ``output_dir/<k5|n250>-seed<seed>/`` and writes ``summary.md`` and
``summary.json``: mean and standard deviation of test F1 over the seeds per variant, as in
the paper's Table 2.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TypeVar

from omegaconf import MISSING

from .annotate import AnnotateJobConfig, AnnotateSettings, run_annotation
from .cli import PIPELINE
from .common import RayConfig, init_ray, write_summary
from .merge_labels import MergeJobConfig, MergeSettings, run_merge
from .predict import PredictJobConfig, run_prediction
from .rowjob import PoolConfig
from .synthesize import LabelStage, SynthesizeJobConfig, run_synthesis, sampling_defaults
from knowfree_core import commandline
from knowfree_core.bounds import COUNT, NON_NEGATIVE, PROBABILITY, check_bounds
from knowfree_core.config import KnowFreeConfig, Step, load_config, load_structured, with_changes, with_overrides
from knowfree_core.errors import ConfigError
from knowfree_core.formats import read_dataset, write_dataset
from knowfree_core.llm.engine import EngineConfig, GenerationParams
from knowfree_core.merging import LabelMap, apply_label_map
from knowfree_core.records import Sentence
from knowfree_core.report.document import markdown_table
from knowfree_core.run import load_pool_and_dev, load_split, run_training, select_training_sentences
from knowfree_core.safe_paths import child_path, plain_name
from knowfree_core.annotation import check_inputs_exist
from knowfree_core.self_training import PseudoLabelRule, select_pseudo_labeled
from knowfree_core.synthesis import SynthesisSettings

logger = logging.getLogger("jobs.pipeline")

#: The ablations of the paper's Table 3, each a change to F: (training file, extension sources
#: left out, model settings). "w/o S.L." (no synonym merging) trains on the annotated file.
ABLATIONS: dict[str, tuple[str, tuple[str, ...], dict[str, Any]]] = {
    "F-noent": ("fused", (":ent",), {}),
    "F-nopos": ("fused", (":pos",), {}),
    "F-nomerge": ("annotated", (), {}),
    "F-cnn": ("fused", (), {"grid_mixer": "cnn"}),
}
VARIANTS = ("F", "FS", "FU", "FSU", "noext", "biaffine", *ABLATIONS)
#: The built-in variants that train on F's labels of the ``unlabeled`` pool.
SELF_TRAINING_VARIANTS = ("FU", "FSU")
#: Each variant's training folder in a cell.
TRAIN_DIRS = {"F": "train", "FS": "train_fs", "FU": "train_fu", "FSU": "train_fsu", "noext": "train_noext",
              "biaffine": "train_biaffine"} | {
    name: "train_" + name.lower().replace("-", "_") for name in ABLATIONS
}


@dataclass
class AnnotateStage(AnnotateSettings):
    """A cell's jobs.annotate settings (the pipeline fills in input, output_dir and ray)."""

    #: None: the train config's first ``data.annotators`` entry, else lac.
    annotator: Optional[str] = None
    #: None: the train config's ``data.annotation_steps``.
    steps: Optional[List[Step]] = None


@dataclass
class UnlabeledStage:
    """Self-training (variants FU and FSU): the unlabelled in-domain pool and how its
    pseudo-labelled sentences are chosen. The pool is read as ``jobs.predict`` reads its input."""

    #: Dataset files (their labels are ignored) or folders of raw text, one sentence a line.
    input: List[str] = field(default_factory=list)
    format: Optional[str] = None
    read_options: Dict[str, Any] = field(default_factory=dict)
    joiner: str = ""  # raw text: "" splits characters (zh), " " whitespace tokens (en)
    #: Leave out pool sentences whose text is one of the cell's gold training sentences (a pool
    #: that is the rest of the training corpus holds the subset too).
    exclude_training_sentences: bool = True
    rule: PseudoLabelRule = field(default_factory=PseudoLabelRule)
    #: Label the pool again with each round's newer model and retrain (1: F's labels only).
    rounds: int = 1
    #: The prediction actors (jobs.predict's pool).
    pool: PoolConfig = field(default_factory=lambda: PoolConfig(num_actors=1, batch_size=32))

    def __post_init__(self) -> None:
        check_bounds("unlabeled", self, {"rounds": COUNT})


@dataclass
class VariantSpec:
    """A named variant of a cell beside the built-in ones: F's training file (the fused
    samples) or, with ``extension_labels: false``, the plain subset, trained with
    ``train_overrides`` on top of the cell's config. Knowledge settings are compared this way:
    ``F-view: {train_overrides: [model.alpha_scheme=view]}``."""

    train_overrides: List[str] = field(default_factory=list)
    extension_labels: bool = True
    #: Keys of the cell's ``annotate`` settings (AnnotateStage) that this variant replaces
    #: (e.g. ``annotators: [lac, jieba]``, or a trained model as an annotator); the cell's other
    #: keys stay. Empty: F's annotation. A variant with its own annotation gets its own
    #: ``annotate_<name>/`` and ``merge_<name>/`` folders, on the same training subset, so its
    #: comparison with F and noext stays paired. A mapping, not an AnnotateStage, because only
    #: the keys given replace the cell's; they are checked against the schema on loading.
    annotate: Dict[str, Any] = field(default_factory=dict)
    #: Self-train as FU does, on this variant's training file plus pseudo samples of a pool:
    #: ``FU-msra: {self_training: true, unlabeled: {input: [msra_train.txt]}}`` compares an
    #: out-of-domain pool with the cell's, ``{self_training: true, train_overrides:
    #: [model.beta_unlabeled=0.5]}`` a weight. The pool is labelled by F's model.
    self_training: bool = False
    #: Keys of the cell's ``unlabeled`` settings (UnlabeledStage) that this variant replaces.
    unlabeled: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # An unknown key or a wrong type fails on loading.
        self.annotation(AnnotateStage())
        self.pool(UnlabeledStage())
        if self.unlabeled and not self.self_training:
            raise ConfigError("a custom variant with unlabeled settings needs self_training: true")
        if self.self_training and not self.extension_labels:
            raise ConfigError("a self-training custom variant builds on F's training file: extension_labels must be true")

    def annotation(self, cell: AnnotateStage) -> AnnotateStage:
        """This variant's annotate settings: ``cell``'s with the keys of ``annotate`` replaced."""
        return with_changes(cell, self.annotate, "custom variant annotate")

    def pool(self, cell: UnlabeledStage) -> UnlabeledStage:
        """This variant's self-training settings: ``cell``'s with the keys of ``unlabeled`` replaced."""
        return with_changes(cell, self.unlabeled, "custom variant unlabeled")


@dataclass
class TrainResources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        check_bounds("train_resources", self, {"num_cpus": NON_NEGATIVE, "num_gpus": NON_NEGATIVE})


@dataclass
class SynthesisStage:
    """Pipeline 2 settings (variant FS); see jobs.synthesize."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    generation: GenerationParams = field(default_factory=sampling_defaults)
    synthesis: SynthesisSettings = field(default_factory=SynthesisSettings)
    #: Only the first this many training sentences get continuations (None: all of them).
    max_sources: Optional[int] = None
    #: Answer cache; default ``<cell>/synthesize/answers.sqlite``. One shared path lets cells
    #: with the same sentences (several seeds) reuse answers.
    cache: Optional[str] = None
    pool: PoolConfig = field(default_factory=lambda: PoolConfig(num_actors=1, batch_size=16))
    label: LabelStage = field(default_factory=LabelStage)
    #: jobs.synthesize's max_error_rate: the share of sources an engine may fail before the run fails.
    max_error_rate: float = 0.2

    def __post_init__(self) -> None:
        check_bounds("synthesis", self, {"max_sources": COUNT, "max_error_rate": PROBABILITY})


@dataclass
class GridConfig:
    """Several training subsets: one cell per (k or size, seed). Empty: one cell, the train
    config's own subset."""

    k_shot: List[int] = field(default_factory=list)
    subset_sizes: List[int] = field(default_factory=list)
    seeds: List[int] = field(default_factory=list)
    #: Variants per cell (default: the pipeline's ``variant``); F and FS share F's stages.
    variants: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_bounds("grid", self, {"k_shot": COUNT, "subset_sizes": COUNT})


@dataclass
class CellSettings:
    """How the cells of one training config run, stage by stage: what jobs.pipeline's config
    and each dataset of bench/quality.py share."""

    #: The training config (``knowfree train``'s file); data.train/dev/test, subset, model, train.
    train_config: str = MISSING
    train_overrides: List[str] = field(default_factory=list)
    #: jobs.annotate settings; input, output_dir and ray are filled in by the pipeline.
    annotate: AnnotateStage = field(default_factory=AnnotateStage)
    #: jobs.merge_labels settings; input, output_dir and ray are filled in by the pipeline.
    merge: MergeSettings = field(default_factory=MergeSettings)
    #: Skip merging (e.g. offline annotators whose labels are already standard).
    merge_labels: bool = True
    synthesis: SynthesisStage = field(default_factory=SynthesisStage)
    unlabeled: UnlabeledStage = field(default_factory=UnlabeledStage)
    train_resources: TrainResources = field(default_factory=TrainResources)
    #: Named variants beyond the built-in ones (name -> VariantSpec), usable in ``variant`` and
    #: ``grid.variants``; a name is a plain folder name and must not shadow a built-in variant.
    custom_variants: Dict[str, VariantSpec] = field(default_factory=dict)

    def cpu_slots(self) -> float:
        """The CPU slots the busiest stage needs at once: what a local cluster started for the
        cells must have, since it cannot grow later (a stage short of slots would wait forever,
        so ``init_ray`` refuses it). Slots are logical: more than the cores only queues work."""
        pools = [self.annotate.pool, self.merge.pool, self.synthesis.pool, self.synthesis.label.pool]
        pools += [stage.pool for stage in self.self_training_stages().values()]
        return max([self.train_resources.num_cpus] + [pool.cpu_slots() for pool in pools])

    def self_training_stages(self) -> dict[str, UnlabeledStage]:
        """Each self-training variant's pool settings, by name: FU's and FSU's are ``unlabeled``,
        a custom self-training variant's are ``unlabeled`` with its own keys replaced."""
        stages = {variant: self.unlabeled for variant in SELF_TRAINING_VARIANTS}
        stages |= {name: spec.pool(self.unlabeled) for name, spec in self.custom_variants.items() if spec.self_training}
        return stages


@dataclass
class PipelineConfig(CellSettings):
    output_dir: str = MISSING
    variant: str = "F"
    grid: GridConfig = field(default_factory=GridConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def schema_fields(config: Any, schema: type) -> dict[str, Any]:
    """The values of the dataclass ``schema``'s fields in ``config`` (an instance of a schema
    that extends it, such as a bench dataset entry's CellSettings and GridConfig), by name."""
    return {f.name: getattr(config, f.name) for f in fields(schema)}


Job = TypeVar("Job")


def _job_config(schema: type[Job], settings: Any, **fixed: Any) -> Job:
    """A stage's job config: the pipeline's typed section for the stage (a copy, so a job
    cannot change the pipeline's) plus what the pipeline fixes (paths, Ray)."""
    values = copy.deepcopy(schema_fields(settings, type(settings)))
    return schema(**(values | fixed))


def _train_remote(config: KnowFreeConfig) -> dict:
    # A Ray worker's root logger stays at WARNING: let the run's train.log get the epoch lines.
    logging.getLogger("knowfree_core").setLevel(logging.INFO)
    return run_training(config, progress=False).metrics


def _scores(metrics: dict) -> dict:
    return {"dev": metrics.get("dev"), "test": metrics.get("test"), "best_epoch": metrics.get("best_epoch"),
            "train_sentences": metrics.get("train_sentences")}


#: Trains one variant's final config and returns its metrics (``metrics.json``'s content).
Trainer = Callable[[str, KnowFreeConfig], dict]


class Cell:
    """One training subset and the stages of its variants, in ``root``.

    ``trainer`` trains each variant; the default is a Ray task with ``train_resources``.
    ``bench/quality_gpu.py`` passes one that writes the final config and training file out
    instead, to train them on a machine without Ray.
    """

    def __init__(self, config: PipelineConfig, train_config: KnowFreeConfig, root: Path,
                 trainer: Optional[Trainer] = None):
        self.config = config
        self.train_config = train_config
        self.root = root
        self.trainer = trainer or self._train_on_ray
        self.stages: dict[str, Any] = {}

    # -- stages ----------------------------------------------------------------------------

    def subset(self) -> Path:
        path = self.root / "train_subset.jsonl"
        if not path.exists():
            pool, _ = load_pool_and_dev(self.train_config)  # without a held-out dev set
            write_dataset(select_training_sentences(self.train_config, pool), path)
        return path

    def annotate(self, source: Path, out: Path, settings: Optional[AnnotateStage] = None) -> Path:
        settings = self.config.annotate if settings is None else settings
        data = self.train_config.data
        annotate_config = _job_config(
            AnnotateJobConfig, settings, input=[str(source)], output_dir=str(out), ray=self.config.ray,
            annotator=(data.annotators or ["lac"])[0] if settings.annotator is None else settings.annotator,
            steps=list(data.annotation_steps if settings.steps is None else settings.steps),
        )
        self.stages[out.name] = run_annotation(annotate_config)
        return out / "annotated.jsonl"

    def fused(self, variant: Optional[str] = None) -> Path:
        """Pipeline 1: the training subset with merged extension labels -- F's, or those of a
        custom ``variant`` that brings its own annotation settings."""
        spec = self.config.custom_variants.get(variant) if variant else None
        settings, tag = None, ""
        if spec is not None and spec.annotate:
            settings = spec.annotation(self.config.annotate)
            tag = train_dir(variant)[len("train"):]  # "_f_jieba" for F-jieba
        annotated = self.annotate(self.subset(), self.root / f"annotate{tag}", settings)
        if not self.config.merge_labels:
            return annotated
        out = self.root / f"merge{tag}"
        if (out / "summary.json").exists():
            self.stages[out.name] = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        else:
            merge_config = _job_config(MergeJobConfig, self.config.merge, input=str(annotated), output_dir=str(out),
                                       ray=self.config.ray)
            self.stages[out.name] = run_merge(merge_config)
        return out / "merged.jsonl"

    def train(self, variant: str, training_file: Path, model_changes: Optional[dict] = None,
              overrides: Optional[List[str]] = None) -> dict:
        run_dir = self.root / train_dir(variant)
        metrics_path = run_dir / "metrics.json"
        if metrics_path.exists():  # finished: do not even load the data again
            return json.loads(metrics_path.read_text(encoding="utf-8"))
        base = self.train_config
        # The training file already holds the subset and its extension labels: no sampling,
        # no annotators here.
        data = replace(base.data, train=str(training_file), subset_size=None, k_shot=None, annotators=[],
                       **self._jsonl_eval_splits(base))
        model = base.model
        if variant in ("noext", "biaffine"):
            model = replace(model, use_extension_labels=False, use_local_attention=variant != "biaffine")
        model = replace(model, **(model_changes or {}))
        final = replace(base, data=data, model=model, output_dir=str(run_dir))
        final = with_overrides(final, list(overrides or []), f"train_overrides of variant {variant}")
        return self.trainer(variant, final)

    def _train_on_ray(self, variant: str, final: KnowFreeConfig) -> dict:
        import ray

        resources = self.config.train_resources
        task = ray.remote(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus or None)(_train_remote)
        return ray.get(task.remote(final))

    def _jsonl_eval_splits(self, base: KnowFreeConfig) -> dict[str, Any]:
        """The training file is always this cell's JSONL; when the config reads its splits with
        a format or reader options (CoNLL-U ``task: pos``), dev and test get JSONL copies in the
        cell too, so that one format (jsonl, no options) reads every split. A dev set held out
        of the training file (``data.dev_from_train``) is written to the cell as ``dev.jsonl``."""
        copies: dict[str, Any] = {}
        if base.data.format or base.data.read_options:
            copies = {"format": None, "read_options": {}}
            for split in ("dev", "test"):
                source = getattr(base.data, split)
                if source:
                    target = self.root / f"{split}.jsonl"
                    if not target.exists():
                        write_dataset(load_split(base, source), target)
                    copies[split] = str(target)
        if base.data.dev_from_train is not None:
            target = self.root / "dev.jsonl"
            if not target.exists():
                write_dataset(load_pool_and_dev(base)[1], target)
            copies.update(dev=str(target), dev_from_train=None)
            if "format" not in copies:  # the training file is JSONL; so is the held-out dev
                copies.update(format=None, read_options={})
                if base.data.test:
                    test = self.root / "test.jsonl"
                    if not test.exists():
                        write_dataset(load_split(base, base.data.test), test)
                    copies["test"] = str(test)
        return copies

    def synthetic(self, fused: Path, f_model: Path) -> Path:
        """Pipeline 2: synthetic sentences labelled by the F model, with extension labels
        renamed by F's label map; returns the fused + synthetic training file."""
        stage = self.config.synthesis
        sources = self.subset()
        if stage.max_sources is not None:
            chosen = read_dataset(sources, format="jsonl")[: stage.max_sources]
            sources = self.root / "synthesis_sources.jsonl"
            write_dataset(chosen, sources)
        synth_config = SynthesizeJobConfig(
            input=[str(sources)], format="jsonl", output_dir=str(self.root / "synthesize"),
            engine=stage.engine, generation=stage.generation, synthesis=stage.synthesis, cache=stage.cache,
            label_with=str(f_model), label=stage.label, pool=stage.pool, ray=self.config.ray,
            max_error_rate=stage.max_error_rate,
        )
        summary_path = self.root / "synthesize" / "summary.json"
        done = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
        # A summary without "labelling" is from a run that stopped before the labelling stage.
        self.stages["synthesize"] = done if "labelling" in done else run_synthesis(synth_config)
        labeled = Path(self.stages["synthesize"]["labelling"]["labeled"])
        synthetic: list = []
        if labeled.stat().st_size:
            synthetic = self.extension_labeled(labeled, self.root / "synthetic_annotate")
        synthetic = [replace(s, synthetic=True) for s in synthetic]
        out = self.root / "train_fs_data.jsonl"
        write_dataset(read_dataset(fused, format="jsonl") + synthetic, out)
        self.stages["synthetic_sentences"] = len(synthetic)
        return out

    def extension_labeled(self, source: Path, out: Path) -> list[Sentence]:
        """Sentences beyond the training subset (synthetic or pseudo-labelled) with their
        extension labels from the cell's annotation, renamed by F's label map so that they
        share F's merged labels."""
        annotated = read_dataset(self.annotate(source, out), format="jsonl")
        label_map_path = self.root / "merge" / "label_map.json"
        if self.config.merge_labels and label_map_path.exists():
            annotated = apply_label_map(annotated, LabelMap.load(label_map_path))
        return annotated

    def pseudo_labeled(self, model_dir: Path, stage: UnlabeledStage, predict_tag: str,
                       pseudo_tag: str) -> list[Sentence]:
        """Self-training: the pool labelled by the model in ``model_dir``, the sentences the
        rule keeps, with their extension labels (renamed by F's label map), flagged
        ``pseudo_labeled``. Folders: ``predict_unlabeled<predict_tag>/``,
        ``pseudo<pseudo_tag>.jsonl`` and ``pseudo_annotate<pseudo_tag>/``."""
        predictions = self.predict(model_dir, stage, self.root / f"predict_unlabeled{predict_tag}")
        gold = [s.text for s in read_dataset(self.subset(), format="jsonl")] if stage.exclude_training_sentences else []
        with open(predictions, encoding="utf-8") as handle:
            selection = select_pseudo_labeled((json.loads(line) for line in handle if line.strip()), stage.rule, gold)
        self.stages[f"pseudo{pseudo_tag}"] = selection.to_dict()
        if not selection.samples:
            logger.warning("self-training (pseudo%s): no pool sentence passed the rule (%s)", pseudo_tag,
                           selection.counts)
            return []
        chosen = self.root / f"pseudo{pseudo_tag}.jsonl"
        write_dataset(selection.samples, chosen)
        annotated = self.extension_labeled(chosen, self.root / f"pseudo_annotate{pseudo_tag}")
        # jobs.annotate writes the records it read; the flag is set again so that it holds
        # whatever the annotation keeps.
        return [replace(s, pseudo_labeled=True, synthetic=False) for s in annotated]

    def predict(self, model_dir: Path, stage: UnlabeledStage, out: Path) -> Path:
        """The pool of ``stage`` labelled by ``model_dir`` (jobs.predict, resumable); returns the
        prediction rows' file."""
        config = PredictJobConfig(
            input=list(stage.input), format=stage.format, read_options=dict(stage.read_options),
            joiner=stage.joiner, model=str(model_dir), output_dir=str(out), pool=copy.deepcopy(stage.pool),
            ray=self.config.ray,
            # Partial annotation needs the doubtful spans too: the pool is labelled down to them.
            threshold=stage.rule.doubt_score,
        )
        summary = run_prediction(config)
        self.stages[out.name] = summary
        return Path(summary["predictions"])

    def self_trained(self, variant: str, base_file: Path, stage: Optional[UnlabeledStage] = None,
                     overrides: Optional[List[str]] = None) -> dict:
        """FU (``base_file`` = fused), FSU (fused + synthetic) or a custom self-training variant
        (its own ``stage``): ``rounds`` rounds of labelling the pool and training on
        ``base_file`` plus the pseudo samples; the last round's metrics.

        Round 1 labels the pool with F's model, so variants that share the cell's pool share
        ``predict_unlabeled/``, and those that also share its rule share ``pseudo.jsonl``;
        later rounds (another model) and other pools get folders tagged with the variant."""
        cell = self.config.unlabeled
        stage = stage or cell
        pool_fields = ("input", "format", "read_options", "joiner")
        # Another pool, or the same pool labelled down to another score, gets its own predictions.
        own_predictions = (any(getattr(stage, name) != getattr(cell, name) for name in pool_fields)
                           or stage.rule.doubt_score != cell.rule.doubt_score)
        own_rule = own_predictions or stage.rule != cell.rule or stage.exclude_training_sentences != cell.exclude_training_sentences
        variant_tag = train_dir(variant)[len("train"):]  # "_fu", "_fsu", "_fu_msra"
        model_dir = self.root / TRAIN_DIRS["F"] / "model"
        metrics: dict = {}
        base = read_dataset(base_file, format="jsonl")
        for round_number in range(1, stage.rounds + 1):
            round_tag = f"_r{round_number}" if round_number > 1 else ""
            later = round_number > 1
            pseudo = self.pseudo_labeled(
                model_dir, stage,
                predict_tag=variant_tag + round_tag if later or own_predictions else "",
                pseudo_tag=variant_tag + round_tag if later or own_rule else "",
            )
            name = variant + round_tag.replace("_r", "-r")  # FU, FU-r2 ...
            training_file = self.root / f"{train_dir(name)}_data.jsonl"
            write_dataset(base + pseudo, training_file)
            self.stages[f"{name} pseudo_sentences"] = len(pseudo)
            metrics = self.train(name, training_file, overrides=overrides)
            model_dir = self.root / train_dir(name) / "model"
        return metrics

    def ablation_data(self, variant: str, source: str, left_out: tuple[str, ...]) -> Path:
        """The training file of an ablation: the fused (or only annotated) samples without the
        extension spans whose source ends with one of ``left_out`` (``lac:ent`` for ``:ent``)."""
        path = self.root / "annotate" / "annotated.jsonl"
        if source == "fused":
            path = self.root / "merge" / "merged.jsonl" if self.config.merge_labels else path
        if not left_out:
            return path
        out = self.root / f"{train_dir(variant)}_data.jsonl"
        sentences = [
            replace(s, extension_spans=[e for e in s.extension_spans if not e.source.endswith(left_out)])
            for s in read_dataset(path, format="jsonl")
        ]
        write_dataset(sentences, out)
        return out

    # -- the cell --------------------------------------------------------------------------

    def check_pools(self, variants: List[str]) -> None:
        """Each self-training variant's pool is named and there before any stage runs: found
        missing only when the pool is labelled, it would stop the cell after F's training."""
        for variant, stage in self.config.self_training_stages().items():
            if variant not in variants:
                continue
            if not stage.input:
                raise ConfigError(f"variant {variant} needs unlabeled.input: the unlabelled in-domain sentences")
            check_inputs_exist(stage.input, f"variant {variant}: unlabeled.input")

    def run(self, variants: List[str]) -> dict[str, dict]:
        self.check_pools(variants)
        self.root.mkdir(parents=True, exist_ok=True)
        scores: dict[str, dict] = {}
        if {"F", "FS", "FU", "FSU"} & set(variants):
            fused = self.fused()
            # F is trained for FS and FU too (its model labels their sentences): report it.
            scores["F"] = _scores(self.train("F", fused))
            f_model = self.root / TRAIN_DIRS["F"] / "model"
            if "FS" in variants or "FSU" in variants:
                training_file = self.synthetic(fused, f_model)
                if "FS" in variants:
                    scores["FS"] = _scores(self.train("FS", training_file))
                if "FSU" in variants:
                    scores["FSU"] = _scores(self.self_trained("FSU", training_file))
            if "FU" in variants:
                scores["FU"] = _scores(self.self_trained("FU", fused))
        for variant, (source, left_out, model_changes) in ABLATIONS.items():
            if variant in variants:
                self.fused()  # annotate/ and merge/ (both are reused when already there)
                scores[variant] = _scores(self.train(variant, self.ablation_data(variant, source, left_out),
                                                     model_changes))
        for variant in ("noext", "biaffine"):
            if variant in variants:
                scores[variant] = _scores(self.train(variant, self.subset()))
        for variant, spec in self.config.custom_variants.items():
            if variant in variants:
                training_file = self.fused(variant) if spec.extension_labels else self.subset()
                if spec.self_training:
                    self.train("F", self.fused())  # its model labels the pool
                    scores[variant] = _scores(self.self_trained(variant, training_file, spec.pool(self.config.unlabeled),
                                                                spec.train_overrides))
                    continue
                model_changes = None if spec.extension_labels else {"use_extension_labels": False}
                scores[variant] = _scores(self.train(variant, training_file, model_changes, spec.train_overrides))
        record = {"output_dir": str(self.root), "variants": scores, "stages": self.stages,
                  "beta": self.train_config.model.beta}
        (self.root / "cell.json").write_text(json.dumps(record, ensure_ascii=False, indent=1, default=str),
                                             encoding="utf-8")
        return scores


def train_dir(variant: str) -> str:
    """A variant's training folder in a cell: ``train``, ``train_noext``, ``train_f_view``."""
    return TRAIN_DIRS.get(variant) or "train_" + plain_name(variant, "variant").lower().replace("-", "_")


def check_variants(variants: List[str], custom: Dict[str, VariantSpec]) -> None:
    """Every variant is built in or defined in ``custom_variants``, whose names are plain
    folder names that neither shadow a built-in variant nor share a training folder."""
    for name in custom:
        if name in VARIANTS:
            raise ConfigError(f"custom_variants.{name}: {name} is a built-in variant; choose another name")
        plain_name(name, f"custom_variants.{name}")
    folders: dict[str, str] = {}
    for name in list(VARIANTS) + list(custom):
        other = folders.setdefault(train_dir(name), name)
        if other != name:
            raise ConfigError(f"variants {other} and {name} would share the training folder {train_dir(name)}")
    known = list(VARIANTS) + list(custom)
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise ConfigError(f"variant must be one of {', '.join(known)}, got {', '.join(map(repr, unknown))}")


def grid_cells(config: PipelineConfig) -> list[tuple[str, list[str]]]:
    """(cell name, train-config overrides) per grid cell; one unnamed cell without a grid."""
    grid = config.grid
    if grid.k_shot and grid.subset_sizes:
        raise ConfigError("grid: give k_shot or subset_sizes, not both")
    settings = [(f"k{k}", [f"data.k_shot={k}", "data.subset_size=null"]) for k in grid.k_shot] + [
        (f"n{n}", [f"data.subset_size={n}", "data.k_shot=null"]) for n in grid.subset_sizes
    ]
    if not settings:
        if grid.seeds:
            raise ConfigError("grid.seeds needs grid.k_shot or grid.subset_sizes")
        return [("", [])]
    seeds = grid.seeds or [42]
    return [
        (f"{name}-seed{seed}", overrides + [f"data.subset_seed={seed}", f"train.seed={seed}"])
        for name, overrides in settings for seed in seeds
    ]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def summary_table(results: dict[str, dict[str, dict]], variants: List[str]) -> str:
    """Markdown: one row per setting (k5, n250, or the single cell), test F1 mean ± std over
    the seeds per variant, and the number of seeds."""
    by_setting: dict[str, dict[str, list[float]]] = {}
    seeds: dict[str, int] = {}
    for cell, scores in results.items():
        setting = cell.rsplit("-seed", 1)[0] or "run"
        seeds[setting] = seeds.get(setting, 0) + 1
        for variant, score in scores.items():
            if score.get("test"):
                by_setting.setdefault(setting, {}).setdefault(variant, []).append(score["test"]["f1"])
    header = ["setting", "seeds", *(f"{v} test F1" for v in variants)]
    rows = [[setting, seeds[setting], *(_mean_std(values.get(v, [])) for v in variants)]
            for setting, values in by_setting.items()]
    return markdown_table(header, rows, align="lr" + "r" * len(variants))


def cell_table(scores: dict[str, dict]) -> str:
    rows = []
    for variant, score in scores.items():
        dev, test = score.get("dev") or {}, score.get("test") or {}
        rows.append([variant, score.get("train_sentences"), score.get("best_epoch"),
                     *(f"{100 * m[k]:.2f}" if k in m else "–"
                       for m, k in ((dev, "f1"), (test, "precision"), (test, "recall"), (test, "f1")))])
    header = ["variant", "train sentences", "best epoch", "dev F1", "test P", "test R", "test F1"]
    return markdown_table(header, rows, align="lrrrrrr")


def run_pipeline(config: PipelineConfig) -> dict:
    variants = list(config.grid.variants) or [config.variant]
    check_variants(variants, config.custom_variants)
    out = Path(config.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cells = grid_cells(config)
    init_ray(config.ray, min_cpus=config.cpu_slots(), settings="train_resources.num_cpus or a stage's pool")
    results: dict[str, dict] = {}
    for name, overrides in cells:
        train_config = load_config(config.train_config, list(config.train_overrides) + overrides)
        scores = Cell(config, train_config, child_path(out, name, "grid cell") if name else out).run(variants)
        results[name] = scores
        logger.info("cell %s done: %s", name or out.name,
                    ", ".join(f"{v} test F1 {s['test']['f1']:.4f}" for v, s in scores.items() if s.get("test")))

    columns = [v for v in (*VARIANTS, *config.custom_variants) if any(v in scores for scores in results.values())]
    if len(cells) == 1 and not cells[0][0]:
        table = cell_table(results[""])
    else:
        table = summary_table(results, columns)
    engine = config.synthesis.engine
    note = f"\nsynthesis engine: {engine.kind} {engine.model}" if "FS" in variants else ""
    summary = {"variants": variants, "output_dir": str(out), "cells": results,
               "synthesis_engine": asdict(engine) if "FS" in variants else None}
    write_summary(out / "summary.json", summary)
    (out / "summary.md").write_text(table + "\n" + note.lstrip("\n") + "\n", encoding="utf-8")
    print(table + note)
    print(f"run folder: {out}")
    return summary


#: ``python -m jobs.pipeline`` in this process (its options: jobs/cli.py); a user error is raised.
main = PIPELINE.run


if __name__ == "__main__":
    raise SystemExit(commandline.main(PIPELINE))
