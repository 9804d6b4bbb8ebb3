"""Pipeline 1, label extension annotation, as a Ray Data job.

    python -m jobs.annotate --config configs/annotate-weibo.yaml [--set key=value ...]
    ray job submit --working-dir . -- python -m jobs.annotate --config ...

input (any dataset format, or a folder of raw text) → JSONL shards with stable ids →
``read_json`` → ``map_batches`` into a pool of annotator actors (offline tools, a trained
KnowFREE model or an LLM engine; several of them in turn on each batch with
``annotators: [lac, jieba]``) → JSONL/Parquet row files → ``annotated.jsonl`` (what
``knowfree train`` reads) and ``summary.json``.

Resume: Ray Data's own checkpointing (``DataContext.checkpoint_config`` keyed on the id
column) records the ids of every written row; the same command after a crash skips them.
LLM answers also go through an answer cache (SQLite, keyed by engine, model, prompt version
and prompt), so even rows that were annotated but not yet written are not paid for twice.
A rerun with different settings or input is refused unless ``restart=true``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

from omegaconf import MISSING

from .cli import ANNOTATE
from .common import RayConfig, write_summary
from .rowjob import (
    JobPaths, OutputFormat, PoolConfig, actor_restarts, check_or_start, count_done, map_rows_with_actors,
    row_schema,
)
from knowfree_core import commandline
from knowfree_core.annotation import AnnotatorSpec, BatchAnnotator, check_error_rate, collect_output, prepare_input
from knowfree_core.annotators.base import Annotator
from knowfree_core.bounds import COUNT, PROBABILITY, check_bounds
from knowfree_core.config import Step, load_structured, structured_to_dict
from knowfree_core.errors import ConfigError
from knowfree_core.llm.annotator import LLMAnnotator
from knowfree_core.llm.engine import EngineConfig, GenerationParams
from knowfree_core.llm.parsing import DEFAULT_MAX_ANSWER_CHARS

logger = logging.getLogger("jobs.annotate")


@dataclass
class LLMSettings:
    """Used when ``annotator: llm`` (or ``llm`` is in ``annotators``)."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    language: str = "zh"
    prompts_dir: Optional[str] = None
    generation: GenerationParams = field(default_factory=GenerationParams)
    #: SQLite answer cache; default ``<output_dir>/answers.sqlite``. On a multi-node cluster
    #: point it at node-local disk (each node then keeps its own cache).
    cache: Optional[str] = None
    source_prefix: str = "llm"
    #: all: every occurrence of an answered entity in the sentence; first: the first only.
    entity_mode: Literal["all", "first"] = "all"
    #: A longer answer is a counted rejection ("answer too long") and is not parsed.
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS

    def __post_init__(self) -> None:
        check_bounds("llm", self, {"max_answer_chars": COUNT})


@dataclass
class AnnotateSettings:
    """Every jobs.annotate setting but where the sentences come from and go to: a pipeline's
    ``annotate:`` section (jobs.pipeline.AnnotateStage) is this schema."""

    format: Optional[str] = None  # null: from the extension; "text": raw lines
    read_options: Dict[str, Any] = field(default_factory=dict)
    joiner: str = ""  # raw text: "" splits characters (zh), " " whitespace tokens (en)
    output_format: OutputFormat = "jsonl"  # the row files
    annotator: str = "lac"  # lac | jieba | llm | knowfree | package.module:Class
    #: Several annotators, run in turn on each batch in every actor, e.g. [lac, jieba]: each
    #: writes its own sources (lac:pos, jieba:pos ...), so ablations can drop one. Empty: the
    #: one ``annotator``; when set, ``annotator`` is ignored (jobs.pipeline always fills it in).
    annotators: List[str] = field(default_factory=list)
    #: Constructor options. With ``annotator``: that annotator's options (e.g. a user's own
    #: class). With ``annotators``: options by annotator name, e.g.
    #: {knowfree: {model: runs/msra-annotator/model, corpus: msra}, jieba: {hmm: false}}.
    #: An LLM takes its settings from ``llm`` in both cases.
    annotator_options: Dict[str, Any] = field(default_factory=dict)
    #: Steps to run; each annotator runs those it supports (knowfree: ent only) and the
    #: others are skipped for it, logged and listed in the summary's ``steps_by_annotator``.
    steps: List[Step] = field(default_factory=lambda: ["ent", "seg", "pos"])
    max_units: int = 512
    llm: LLMSettings = field(default_factory=LLMSettings)
    pool: PoolConfig = field(default_factory=PoolConfig)
    restart: bool = False
    #: The job fails (exit non-zero, after writing its output) when more than this share of
    #: the sentences had an engine error; such sentences are never recorded as done, and the
    #: same command asks them again. 0: any engine error fails the run; 1: none does.
    max_error_rate: float = 0.2
    #: More distinct extension labels than this is a warning in the summary (the run goes on):
    #: an LLM inventing types grows the label map without bound.
    max_extension_labels: int = 500

    def __post_init__(self) -> None:
        check_bounds("", self, {"max_units": COUNT, "max_error_rate": PROBABILITY, "max_extension_labels": COUNT})


@dataclass
class AnnotateJobConfig(AnnotateSettings):
    """The job's config file: the settings plus the input files, the output folder and Ray."""

    input: List[str] = MISSING
    output_dir: str = MISSING
    ray: RayConfig = field(default_factory=RayConfig)


def load_job_config(path: str | None, overrides: list[str]) -> AnnotateJobConfig:
    return load_structured(AnnotateJobConfig, path, overrides)


def annotator_names(config: AnnotateJobConfig) -> list[str]:
    """The annotators the job runs, in order: ``annotators``, or else ``annotator``."""
    names = list(config.annotators) or [config.annotator]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"annotators lists {', '.join(repeated)} twice; each annotator runs once per sentence")
    if config.annotators:
        strays = sorted(set(config.annotator_options) - set(names))
        if strays:
            raise ConfigError(
                f"annotator_options has {', '.join(map(repr, strays))}, which is not in annotators {names}: "
                "with annotators, annotator_options maps each annotator's name to its options"
            )
        not_maps = sorted(k for k, v in config.annotator_options.items() if not isinstance(v, dict))
        if not_maps:
            raise ConfigError(f"annotator_options.{not_maps[0]} must be a mapping of constructor options")
        if "llm" in config.annotator_options:
            raise ConfigError("annotator_options.llm: the LLM annotator takes its settings from the llm section")
    return names


def _llm_options(config: AnnotateJobConfig) -> dict[str, Any]:
    llm = config.llm
    return {
        "engine": asdict(llm.engine),
        "language": llm.language,
        "prompts_dir": llm.prompts_dir,
        "params": asdict(llm.generation),
        "cache": llm.cache or str(Path(config.output_dir).resolve() / "answers.sqlite"),
        "source_prefix": llm.source_prefix,
        "entity_mode": llm.entity_mode,
        "max_answer_chars": llm.max_answer_chars,
    }


def annotator_specs(config: AnnotateJobConfig) -> list[AnnotatorSpec]:
    """One spec per annotator, each asking for every configured step (``narrow_steps`` then
    keeps those each annotator supports)."""
    specs = []
    for name in annotator_names(config):
        if name == "llm":
            options = _llm_options(config)
        elif config.annotators:
            options = dict(config.annotator_options.get(name, {}))
        else:
            options = dict(config.annotator_options)
        specs.append(AnnotatorSpec(name=name, steps=tuple(config.steps), options=options, max_units=config.max_units))
    return specs


def narrow_steps(spec: AnnotatorSpec, annotator: Annotator) -> AnnotatorSpec:
    """``spec`` with the steps ``annotator`` supports; the others are skipped for it (a
    KnowFREE model has no seg or pos), and an annotator left with none is an error."""
    supported = tuple(getattr(annotator, "supported_steps", spec.steps))
    kept = tuple(step for step in spec.steps if step in supported)
    skipped = [step for step in spec.steps if step not in supported]
    if not kept:
        raise ConfigError(
            f"annotator {spec.name} supports none of steps {list(spec.steps)} (it supports {list(supported)})"
        )
    if skipped:
        logger.info("annotator %s: skipping steps %s (it supports %s)", spec.name, skipped, list(supported))
    return replace(spec, steps=kept)


def _settings_that_change_results(config: AnnotateJobConfig) -> dict[str, Any]:
    settings = structured_to_dict(config)
    # The engine's speed-only settings and the cache location change how fast, not what is computed.
    llm = settings["llm"] | {"engine": config.llm.engine.answer_settings()}
    llm.pop("cache", None)
    if llm["max_answer_chars"] == DEFAULT_MAX_ANSWER_CHARS:
        # Compared only when changed: output folders of the versions before the bound still
        # resume (their answers were within it in all but pathological cases).
        del llm["max_answer_chars"]
    keys = ("annotator", "annotator_options", "steps", "max_units", "joiner", "read_options")
    compared = {k: settings[k] for k in keys}
    if config.annotators:
        # The list replaces ``annotator``, which jobs.pipeline fills in regardless: compare the
        # list (its order too: it is the order spans are added in) and not the ignored name.
        # Without a list the settings are as before, so older output folders still resume.
        del compared["annotator"]
        compared["annotators"] = list(config.annotators)
    return compared | ({"llm": llm} if "llm" in annotator_names(config) else {})


class AnnotateActor:
    """One pool member: builds its annotators once, then annotates Arrow batches."""

    def __init__(self, specs: Sequence[dict[str, Any]]):
        self.batch = BatchAnnotator([AnnotatorSpec(**spec) for spec in specs])

    def __call__(self, table):
        import pyarrow as pa

        return pa.Table.from_pylist(self.batch(table.to_pylist()), schema=output_schema())


def output_schema():
    """The row schema (``BatchAnnotator``'s output rows)."""
    return row_schema(("record", "annotator", "raw_answers", "prompt_versions", "tokens"), count="n_spans")


def run_annotation(config: AnnotateJobConfig) -> dict[str, Any]:
    """Run (or resume) the job; returns the summary dict (also written to summary.json)."""
    paths = JobPaths(Path(config.output_dir).resolve())
    paths.root.mkdir(parents=True, exist_ok=True)
    # Fail fast here (unknown annotator, bad options, missing or wrong key, unknown model or
    # model folder) rather than in every actor or, worse, as one rejection per sentence.
    specs = []
    for spec in annotator_specs(config):
        annotator = spec.build()
        specs.append(narrow_steps(spec, annotator))
        if isinstance(annotator, LLMAnnotator):
            annotator.check_access("llm.engine")  # the key in this job's config
        elif hasattr(annotator, "check_access"):
            annotator.check_access()

    prepared = prepare_input(config.input, paths.prepared, config.format, dict(config.read_options), config.joiner)
    state = {"input": prepared.fingerprint, "sentences": prepared.sentences, "settings": _settings_that_change_results(config)}
    check_or_start(paths, state, config.restart)
    already = count_done(paths.rows)
    logger.info("%d sentences in %d shards; %d already done", prepared.sentences, len(prepared.shards), already)

    started = time.perf_counter()
    restarts = {"actor_starts": 0, "actor_restarts": 0}
    if already < prepared.sentences:
        map_rows_with_actors(prepared.shards, paths, AnnotateActor, {"specs": [asdict(s) for s in specs]},
                             config.pool, config.ray, config.output_format)
        restarts = actor_restarts(paths, config.pool)
    wall = time.perf_counter() - started

    # The sentences of this run: those done now (written or set aside as engine-failed, which
    # were not done before) less those done before.
    summary, duplicates = collect_output(paths.rows, paths.result, paths.failed, paths.failed_list)
    written_now = summary.sentences - already
    if summary.sentences != prepared.sentences:
        raise RuntimeError(
            f"{summary.sentences} of {prepared.sentences} sentences were written or set aside as failed; "
            "rerun the same command to finish the rest"
        )
    summary.check_label_growth(config.max_extension_labels)
    if "llm" in annotator_names(config):
        summary.price(config.llm.engine)
    summary.wall_seconds = wall
    summary.sentences_per_second = written_now / wall if written_now and wall > 0 else None
    result = summary.to_dict() | {
        "duplicates_dropped": duplicates,
        "written_this_run": written_now,
        "num_actors": config.pool.num_actors,
        **restarts,
        "annotator": "+".join(spec.name for spec in specs),
        "annotators": [spec.name for spec in specs],
        "steps_by_annotator": {spec.name: list(spec.steps) for spec in specs},
        "annotated": str(paths.result),
    }
    write_summary(paths.summary, result)
    print(summary.table())
    if restarts["actor_restarts"]:
        print(f"actor restarts       {restarts['actor_restarts']} (their batches were retried)")
    print(f"annotated sentences: {paths.result}")
    check_error_rate(paths.failed_list, summary.sentences, config.max_error_rate, "sentences")
    return result


#: ``python -m jobs.annotate`` in this process (its options: jobs/cli.py); a user error is raised.
main = ANNOTATE.run


if __name__ == "__main__":
    raise SystemExit(commandline.main(ANNOTATE))
