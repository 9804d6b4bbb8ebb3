"""Pipeline 2, enriched explanation synthesis, as a Ray Data job.

    python -m jobs.synthesize --config configs/synthesize-llm.yaml [--set key=value ...]

training sentences → JSONL shards → ``map_batches`` into a pool of LLM engine actors (the
engines of jobs.annotate: openai, vllm, transformers) asking P_exp (sentences with target
entities) or P_ext (without) → row files → ``synthetic.jsonl`` (the kept sentences, each
flagged synthetic, its id linking to its source) and ``summary.json`` (dropped pieces
counted by reason). With ``label_with: <model dir>`` a second stage labels the target
entities of the synthetic sentences with that frozen model in a pool of model actors
(``labeled/labeled.jsonl``); pipeline 1 (jobs.annotate) then adds their extension labels.

Resume as in jobs.annotate: Ray Data checkpointing keyed on the source id plus the SQLite
answer cache; a rerun with other settings is refused unless ``restart=true``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from .cli import SYNTHESIZE
from .common import RayConfig, write_summary
from .rowjob import (
    JobPaths, OutputFormat, PoolConfig, actor_restarts, check_or_start, count_done, map_rows_with_actors,
    row_schema,
)
from knowfree_core import commandline
from knowfree_core.annotation import check_error_rate, collect_output, prepare_input
from knowfree_core.bounds import COUNT, PROBABILITY, check_bounds
from knowfree_core.config import load_structured, structured_to_dict
from knowfree_core.errors import ConfigError
from knowfree_core.llm.engine import EngineConfig, GenerationParams
from knowfree_core.llm.parsing import DEFAULT_MAX_ANSWER_CHARS
from knowfree_core.synthesis import DEFAULT_SYNTHESIS_PARAMS, SynthesisSettings, Synthesizer, SyntheticLabeler, collect_synthesis

logger = logging.getLogger("jobs.synthesize")


def sampling_defaults() -> GenerationParams:
    return DEFAULT_SYNTHESIS_PARAMS


@dataclass
class LabelStage:
    """The frozen pipeline-1 model labelling target entities in the synthetic sentences."""

    batch_size: int = 32  # sentences per forward pass
    device: str = "cpu"
    num_threads: Optional[int] = None  # torch threads per actor (None: torch's default)
    pool: PoolConfig = field(default_factory=lambda: PoolConfig(num_actors=1, batch_size=256))

    def __post_init__(self) -> None:
        check_bounds("label", self, {"batch_size": COUNT, "num_threads": COUNT})


@dataclass
class SynthesizeJobConfig:
    input: List[str] = MISSING
    format: Optional[str] = None
    read_options: Dict[str, Any] = field(default_factory=dict)
    output_dir: str = MISSING
    output_format: OutputFormat = "jsonl"
    engine: EngineConfig = field(default_factory=EngineConfig)
    generation: GenerationParams = field(default_factory=sampling_defaults)
    synthesis: SynthesisSettings = field(default_factory=SynthesisSettings)
    #: SQLite answer cache; default ``<output_dir>/answers.sqlite``.
    cache: Optional[str] = None
    #: A model folder (``run_dir/model``): label the synthetic sentences with it.
    label_with: Optional[str] = None
    label: LabelStage = field(default_factory=LabelStage)
    pool: PoolConfig = field(default_factory=lambda: PoolConfig(num_actors=1, batch_size=16))
    ray: RayConfig = field(default_factory=RayConfig)
    restart: bool = False
    #: The job fails (exit non-zero, after writing its output) when more than this share of
    #: the source sentences had an engine error; such sources are never recorded as done, and
    #: the same command asks them again.
    max_error_rate: float = 0.2

    def __post_init__(self) -> None:
        check_bounds("", self, {"max_error_rate": PROBABILITY})


def load_job_config(path: str | None, overrides: list[str]) -> SynthesizeJobConfig:
    return load_structured(SynthesizeJobConfig, path, overrides)


class SynthesizeActor:
    """One pool member: one LLM engine, answering batches of source rows."""

    def __init__(self, engine: dict, settings: dict, params: dict, cache: Optional[str]):
        self.synthesizer = Synthesizer(engine, settings, params, cache)

    def __call__(self, table):
        import pyarrow as pa

        return pa.Table.from_pylist(self.synthesizer(table.to_pylist()), schema=synthesis_schema())


class LabelActor:
    """One pool member: one frozen KnowFREE model, labelling batches of synthetic rows."""

    def __init__(self, model_dir: str, batch_size: int, device: str, num_threads: Optional[int]):
        self.labeler = SyntheticLabeler(model_dir, batch_size, device, num_threads)

    def __call__(self, table):
        import pyarrow as pa

        started = time.perf_counter()
        rows = self.labeler(table.to_pylist())
        seconds = (time.perf_counter() - started) / max(len(rows), 1)
        # The annotation row layout, so that annotation.collect_output collects them.
        for row in rows:
            row.update(annotator="knowfree", raw_answers="{}", prompt_versions="{}", tokens="{}", rejections="[]",
                       n_rejections=0, seconds=seconds)
        return pa.Table.from_pylist(rows, schema=label_schema())


def synthesis_schema():
    return row_schema(("synthetic", "raw_answers", "prompt_version", "tokens"), count="n_synthetic")


def label_schema():
    from .annotate import output_schema

    return output_schema()


def _settings_that_change_results(config: SynthesizeJobConfig) -> dict[str, Any]:
    settings = structured_to_dict(config) | {"engine": config.engine.answer_settings()}
    if settings["synthesis"]["max_answer_chars"] == DEFAULT_MAX_ANSWER_CHARS:
        # Compared only when changed: output folders of the versions before the bound resume.
        del settings["synthesis"]["max_answer_chars"]
    return {k: settings[k] for k in ("engine", "generation", "synthesis", "format", "read_options")}


def _label(config: SynthesizeJobConfig, synthetic_path: Path, root: Path) -> dict[str, Any]:
    paths = JobPaths(root / "labeled", result_name="labeled.jsonl")
    paths.root.mkdir(parents=True, exist_ok=True)
    model_dir = str(Path(config.label_with).resolve())
    if not Path(model_dir).is_dir():
        raise ConfigError(f"label_with: {model_dir} is not a model folder (run_dir/model)")
    if synthetic_path.stat().st_size == 0:
        paths.result.write_text("", encoding="utf-8")
        return {"sentences": 0, "target_spans": 0, "labeled": str(paths.result)}
    prepared = prepare_input([str(synthetic_path)], paths.prepared, "jsonl")
    state = {"input": prepared.fingerprint, "sentences": prepared.sentences, "model": model_dir}
    previous = json.loads(paths.state.read_text(encoding="utf-8")) if paths.state.exists() else None
    # The synthetic sentences are this job's own output: a rerun that answers the sources an
    # engine failed before adds to them, and the labels follow (only another model is refused).
    grown = previous is not None and previous.get("model") == model_dir and previous["input"] != state["input"]
    if grown:
        logger.info("the synthetic sentences changed since they were labelled: labelling them again")
    check_or_start(paths, state, config.restart or grown, job="labelling")
    stage = config.label
    if count_done(paths.rows) < prepared.sentences:
        map_rows_with_actors(
            prepared.shards, paths, LabelActor,
            {"model_dir": model_dir, "batch_size": stage.batch_size, "device": stage.device,
             "num_threads": stage.num_threads},
            stage.pool, config.ray, config.output_format,
        )
    summary, _ = collect_output(paths.rows, paths.result)
    if summary.sentences != prepared.sentences:
        raise RuntimeError(f"{summary.sentences} of {prepared.sentences} synthetic sentences were labelled; rerun")
    spans = sum(len(json.loads(line)["spans"]) for line in paths.result.read_text(encoding="utf-8").splitlines())
    result = {"sentences": summary.sentences, "target_spans": spans, "model": model_dir, "labeled": str(paths.result)}
    write_summary(paths.summary, result)
    return result


def run_synthesis(config: SynthesizeJobConfig) -> dict[str, Any]:
    """Run (or resume) the job; returns the summary dict (also written to summary.json)."""
    paths = JobPaths(Path(config.output_dir).resolve(), result_name="synthetic.jsonl")
    paths.root.mkdir(parents=True, exist_ok=True)
    cache = config.cache or str(paths.root / "answers.sqlite")
    actor_kwargs = {
        "engine": asdict(config.engine),
        "settings": asdict(config.synthesis),
        "params": asdict(config.generation),
        "cache": cache,
    }
    # Fail fast here (unknown engine kind or prompt, no model, wrong key or model, endpoint
    # down), not once per prompt; a local model is checked for, not loaded.
    Synthesizer(**actor_kwargs).check_access("engine")

    prepared = prepare_input(config.input, paths.prepared, config.format, dict(config.read_options))
    state = {"input": prepared.fingerprint, "sentences": prepared.sentences,
             "settings": _settings_that_change_results(config)}
    check_or_start(paths, state, config.restart, job="synthesis")
    already = count_done(paths.rows)
    logger.info("%d source sentences; %d already done", prepared.sentences, already)
    started = time.perf_counter()
    restarts = {"actor_starts": 0, "actor_restarts": 0}
    if already < prepared.sentences:
        map_rows_with_actors(prepared.shards, paths, SynthesizeActor, actor_kwargs, config.pool, config.ray,
                             config.output_format)
        restarts = actor_restarts(paths, config.pool)
    summary, duplicates = collect_synthesis(paths.rows, paths.result, failed_dir=paths.failed,
                                            failed_list=paths.failed_list)
    if summary.sources != prepared.sentences:
        raise RuntimeError(
            f"{summary.sources} of {prepared.sentences} source sentences were done or set aside as failed; "
            "rerun the same command"
        )
    summary.wall_seconds = time.perf_counter() - started
    summary.price(config.engine)
    result = summary.to_dict() | {
        "duplicate_rows_dropped": duplicates,
        "written_this_run": summary.sources - already,
        **restarts,
        "engine": {"kind": config.engine.kind, "model": config.engine.model},
        "synthetic": str(paths.result),
    }
    print(summary.table())
    if summary.engine_failed_rows:
        # Before labelling: a run over the rate stops here, and labelling waits for the rerun.
        write_summary(paths.summary, result)
        check_error_rate(paths.failed_list, summary.sources, config.max_error_rate, "source sentences")
    if config.label_with:
        result["labelling"] = _label(config, paths.result, paths.root)
        print(f"labelled {result['labelling']['sentences']} synthetic sentences "
              f"({result['labelling']['target_spans']} target spans): {result['labelling']['labeled']}")
    write_summary(paths.summary, result)
    print(f"synthetic sentences: {paths.result}")
    return result


#: ``python -m jobs.synthesize`` in this process (its options: jobs/cli.py); a user error is raised.
main = SYNTHESIZE.run


if __name__ == "__main__":
    raise SystemExit(commandline.main(SYNTHESIZE))
