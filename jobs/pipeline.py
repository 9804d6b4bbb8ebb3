"""The KnowFREE pipeline on one config, as a Ray job.

    python -m jobs.pipeline --config configs/pipeline-weibo-250.yaml --variant F

Variant ``F`` (paper: KnowFREE-F, pipeline 1): the training sentences (the configured
subset of ``data.train``) → ``jobs.annotate`` (extension labels) → ``jobs.merge_labels``
(synonym labels merged) → training on the fused samples (a Ray task with the configured
resources) → dev/test evaluation. Variants ``noext`` and ``biaffine`` train the ablations of
the same subset without annotation. Each stage writes its own folder under ``output_dir``
and is skipped when its output is already there, so a rerun after a crash continues with
the stage that was interrupted (annotation and training resume inside the stage too).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf

from jobs.annotate import AnnotateJobConfig, run_annotation
from jobs.common import RayConfig, init_ray, run_main
from jobs.merge_labels import MergeJobConfig, run_merge
from knowfree_core.config import KnowFreeConfig, load_config, load_structured
from knowfree_core.errors import ConfigError
from knowfree_core.formats import write_dataset
from knowfree_core.run import load_split, run_training, select_training_sentences

logger = logging.getLogger("jobs.pipeline")

VARIANTS = ("F", "noext", "biaffine")


@dataclass
class TrainResources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class PipelineConfig:
    #: The training config (``knowfree train``'s file); data.train/dev/test, subset, model, train.
    train_config: str = MISSING
    train_overrides: List[str] = field(default_factory=list)
    output_dir: str = MISSING
    variant: str = "F"
    #: jobs.annotate settings; input and output_dir are filled in by the pipeline.
    annotate: Dict[str, Any] = field(default_factory=dict)
    #: jobs.merge_labels settings; input and output_dir are filled in by the pipeline.
    merge: Dict[str, Any] = field(default_factory=dict)
    #: Skip merging (e.g. offline annotators whose labels are already standard).
    merge_labels: bool = True
    train_resources: TrainResources = field(default_factory=TrainResources)
    ray: RayConfig = field(default_factory=RayConfig)


def _stage_config(schema: type, settings: Dict[str, Any], **fixed: Any):
    """A stage's typed config from the pipeline's free-form section plus the fixed paths."""
    merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(dict(settings)), OmegaConf.create(fixed))
    return OmegaConf.to_object(merged)


def _train_remote(config: KnowFreeConfig) -> dict:
    return run_training(config, progress=False).metrics


def run_pipeline(config: PipelineConfig) -> dict:
    import ray

    if config.variant not in VARIANTS:
        raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}, got {config.variant!r}")
    out = Path(config.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train_config = load_config(config.train_config, list(config.train_overrides))
    init_ray(config.ray, min_cpus=config.train_resources.num_cpus)

    # The sentences this run trains on: annotate only those (an LLM call costs money).
    subset_path = out / "train_subset.jsonl"
    if not subset_path.exists():
        pool = load_split(train_config, train_config.data.train)
        write_dataset(select_training_sentences(train_config, pool), subset_path)
    training_file = subset_path
    stages: dict[str, Any] = {}

    if config.variant == "F":
        annotate_settings = dict(config.annotate)
        annotate_settings.setdefault("annotator", (train_config.data.annotators or ["lac"])[0])
        annotate_settings.setdefault("steps", list(train_config.data.annotation_steps))
        annotate_config = _stage_config(
            AnnotateJobConfig, annotate_settings, input=[str(subset_path)], output_dir=str(out / "annotate")
        )
        annotate_config.ray = config.ray
        stages["annotate"] = run_annotation(annotate_config)
        training_file = out / "annotate" / "annotated.jsonl"
        if config.merge_labels:
            merge_config = _stage_config(
                MergeJobConfig, dict(config.merge), input=str(training_file), output_dir=str(out / "merge")
            )
            merge_config.ray = config.ray
            if (out / "merge" / "summary.json").exists():
                stages["merge"] = json.loads((out / "merge" / "summary.json").read_text(encoding="utf-8"))
            else:
                stages["merge"] = run_merge(merge_config)
            training_file = out / "merge" / "merged.jsonl"

    # The fused samples already carry their extension labels: no subset, no annotators here.
    data = replace(train_config.data, train=str(training_file), subset_size=None, k_shot=None, annotators=[])
    model = train_config.model
    if config.variant != "F":
        model = replace(model, use_extension_labels=False, use_local_attention=config.variant != "biaffine")
    final = replace(train_config, data=data, model=model, output_dir=str(out / "train"))

    resources = config.train_resources
    metrics = ray.get(
        ray.remote(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus or None)(_train_remote).remote(final)
    )
    stages["train"] = {"dev": metrics["dev"], "test": metrics["test"], "best_epoch": metrics.get("best_epoch")}
    summary = {"variant": config.variant, "output_dir": str(out), **stages}
    (out / "pipeline.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1, default=str), encoding="utf-8")
    dev, test = metrics["dev"], metrics["test"]
    print(f"variant {config.variant}: dev F1 {dev['f1']:.4f}  test P {test['precision']:.4f} "
          f"R {test['recall']:.4f} F1 {test['f1']:.4f}  ({out / 'train'})")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="annotate → merge_labels → train → evaluate")
    parser.add_argument("--config", required=True, help="pipeline YAML config")
    parser.add_argument("--variant", choices=VARIANTS, help="overrides the config's variant")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    overrides = list(args.set) + ([f"variant={args.variant}"] if args.variant else [])
    run_pipeline(load_structured(PipelineConfig, args.config, overrides))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
