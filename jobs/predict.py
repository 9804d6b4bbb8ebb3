"""Prediction with a saved KnowFREE model over a large input, as a Ray Data job.

    python -m jobs.predict --config configs/predict.yaml [--set key=value ...]
    ray job submit --working-dir . -- python -m jobs.predict --config ...

input (any dataset format, a folder of raw text, or Parquet with a text column) → JSONL
shards with stable ids (``knowfree_core.annotation.prepare_input``) → ``read_json`` →
``map_batches`` into a pool of model actors (each loads the model once and labels its
batches with ``knowfree_core.prediction``: length buckets, long sentences through windows)
→ JSONL/Parquet row files in ``rows/`` → ``predictions.jsonl`` (or ``.parquet``) in input
order and ``summary.json``. A row: ``id``, ``text``, ``spans`` (start, end, label, text,
score), ``windows``, ``model`` and ``model_version`` (a fingerprint of the model folder).

Resume as in jobs.annotate (``jobs.rowjob``): Ray Data's checkpointing keyed on the id
column skips the rows already written; a rerun with another model (by its fingerprint, not
its path), other settings or other input is refused unless ``restart=true``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from .cli import PREDICT
from .common import RayConfig, write_summary
from .fault_injection import exit_on_id, exit_once_on
from .rowjob import (
    JobPaths, OutputFormat, PoolConfig, actor_restarts, check_or_start, count_done, map_rows_with_actors,
)
from knowfree_core import commandline
from knowfree_core.annotation import check_inputs_exist, collect_rows, prepare_input
from knowfree_core.bounds import COUNT, check_bounds
from knowfree_core.config import load_structured
from knowfree_core.errors import ConfigError
from knowfree_core.formats import write_dataset
from knowfree_core.prediction import (
    PredictSettings, model_fingerprint, parquet_sentences, predict_sentences, prediction_record,
)
from knowfree_core.records import Sentence

logger = logging.getLogger("jobs.predict")

MANIFEST = "knowfree.json"  # what makes a folder a saved model (KnowFreeModel.save_pretrained)


@dataclass
class PredictJobConfig(PredictSettings):
    """The job's config file: the prediction settings (``threshold``, ``min_score``,
    ``max_units``, ``stride``), the model, the input, the output folder and Ray."""

    #: A saved model folder (``<run_dir>/model`` of knowfree train).
    model: str = MISSING
    input: List[str] = MISSING
    output_dir: str = MISSING
    #: null: from the extension (``.parquet`` is Parquet); ``text``: raw lines; ``parquet``.
    format: Optional[str] = None
    read_options: Dict[str, Any] = field(default_factory=dict)
    joiner: str = ""  # raw text and Parquet: "" splits characters (zh), " " whitespace tokens (en)
    #: Parquet input: the column of sentences, and the column of their ids (a file without it
    #: gets ids ``<file>:<row>``).
    text_column: str = "text"
    id_column: str = "id"
    output_format: OutputFormat = "jsonl"
    #: Sentences (windows of long ones) per forward pass inside an actor; ``pool.batch_size``
    #: is how many rows reach an actor at once, sorted into length buckets there.
    batch_size: int = 32
    #: ``auto``: CUDA when the actor has a GPU (``pool.gpus_per_actor``), else the CPU.
    device: str = "auto"
    #: bf16 autocast on a GPU (about twice the speed; scores differ in the third digit).
    bf16: bool = True
    pool: PoolConfig = field(default_factory=lambda: PoolConfig(num_actors=2, batch_size=256))
    ray: RayConfig = field(default_factory=RayConfig)
    restart: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bounds("", self, {"batch_size": COUNT})


def load_job_config(path: str | None, overrides: list[str]) -> PredictJobConfig:
    return load_structured(PredictJobConfig, path, overrides)


def prediction_schema(collected: bool = False) -> Any:
    """The Arrow schema of the rows (``order`` and the actor's ``seconds`` only in ``rows/``,
    not in the collected file). Built on call so that importing the job needs no pyarrow."""
    import pyarrow as pa

    span = pa.struct([("start", pa.int64()), ("end", pa.int64()), ("label", pa.string()), ("text", pa.string()),
                      ("score", pa.float64())])
    columns = [("id", pa.string()), ("order", pa.int64()), ("text", pa.string()), ("spans", pa.list_(span)),
               ("windows", pa.int64()), ("model", pa.string()), ("model_version", pa.string()),
               ("seconds", pa.float64())]
    return pa.schema([c for c in columns if not collected or c[0] not in ("order", "seconds")])


class PredictActor:
    """One pool member: loads the model once, then labels Arrow batches of prepared rows."""

    def __init__(self, model_dir: str, model_version: str, settings: dict[str, Any], batch_size: int, device: str,
                 bf16: bool, num_threads: int, exit_on: Optional[str] = None, root: str = "."):
        import torch

        from knowfree_core.model.knowfree import KnowFreeModel

        # Torch would use every core of the node: actors sharing a node would fight over them.
        torch.set_num_threads(num_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = KnowFreeModel.from_pretrained(model_dir, device=device)
        self.autocast = bf16 and self.model.device.type == "cuda"
        self.model_dir, self.model_version = model_dir, model_version
        self.settings = PredictSettings(**settings)
        self.batch_size = batch_size
        self.exit_on, self.root = exit_on, root

    def __call__(self, table):
        import pyarrow as pa
        import torch

        rows = table.to_pylist()
        exit_once_on(self.exit_on, [row["id"] for row in rows], self.root)  # tests only
        sentences = [Sentence.from_dict(json.loads(row["record"])) for row in rows]
        started = time.perf_counter()
        precision = (torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext())
        with precision:
            predictions = predict_sentences(self.model, sentences, self.settings, self.batch_size)
        seconds = (time.perf_counter() - started) / max(len(rows), 1)
        out = [
            prediction_record(sentence, prediction) | {
                "id": str(row["id"]), "order": int(row["order"]), "model": self.model_dir,
                "model_version": self.model_version, "seconds": seconds,
            }
            for row, sentence, prediction in zip(rows, sentences, predictions)
        ]
        return pa.Table.from_pylist(out, schema=prediction_schema())


def _is_parquet(path: str, format: Optional[str]) -> bool:
    return format == "parquet" or (format is None and Path(path).suffix == ".parquet")


def _dataset_inputs(config: PredictJobConfig, folder: Path) -> tuple[list[str], Optional[str]]:
    """The inputs and format for ``prepare_input``: each Parquet file becomes a JSONL dataset
    in ``folder`` with the same stem (the id prefix ``prepare_input`` gives several inputs)."""
    inputs = []
    for item in config.input:
        if not _is_parquet(item, config.format):
            inputs.append(item)
            continue
        check_inputs_exist([item])
        folder.mkdir(parents=True, exist_ok=True)
        converted = folder / f"{Path(item).stem}.jsonl"
        write_dataset(parquet_sentences(item, config.text_column, config.id_column, config.joiner), converted)
        inputs.append(str(converted))
    return inputs, "jsonl" if config.format == "parquet" else config.format


def _settings(config: PredictJobConfig) -> PredictSettings:
    return PredictSettings(**{f.name: getattr(config, f.name) for f in fields(PredictSettings)})


def _state(config: PredictJobConfig, fingerprint: str, sentences: int, model_version: str) -> dict[str, Any]:
    """What check_or_start compares: the input, the model's fingerprint and every setting that
    changes a row (not the pool, batch sizes or device: they change how fast)."""
    return {"input": fingerprint, "sentences": sentences, "model": model_version,
            "settings": asdict(_settings(config)) | {"bf16": config.bf16}}


def _collect(paths: JobPaths, output_format: OutputFormat) -> tuple[list[dict[str, Any]], int]:
    """Write the rows in input order, each once, to ``paths.result``; return them and the
    number of duplicate rows dropped (0 when every row was written exactly once)."""
    columns = prediction_schema(collected=True).names
    collected = collect_rows(paths.rows)
    unique = [{key: row[key] for key in columns} for row in collected.rows]
    if output_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(unique, schema=prediction_schema(collected=True)), paths.result)
    else:
        with open(paths.result, "w", encoding="utf-8") as handle:
            for row in unique:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return unique, collected.duplicates


def run_prediction(config: PredictJobConfig) -> dict[str, Any]:
    """Run (or resume) the job; returns the summary dict (also written to summary.json)."""
    model_dir = Path(config.model).resolve()
    # Fail fast here, not in every actor, and before anything is written.
    if not (model_dir / MANIFEST).is_file():
        raise ConfigError(f"model: {model_dir} is not a saved KnowFREE model (no {MANIFEST}; expected <run_dir>/model)")
    model_version = model_fingerprint(model_dir)
    paths = JobPaths(Path(config.output_dir).resolve(), result_name=f"predictions.{config.output_format}")
    paths.root.mkdir(parents=True, exist_ok=True)

    inputs, format = _dataset_inputs(config, paths.root / "parquet_input")
    prepared = prepare_input(inputs, paths.prepared, format, dict(config.read_options), config.joiner)
    check_or_start(paths, _state(config, prepared.fingerprint, prepared.sentences, model_version), config.restart,
                   job="prediction")
    already = count_done(paths.rows)
    logger.info("%d sentences in %d shards; %d already done", prepared.sentences, len(prepared.shards), already)

    started = time.perf_counter()
    restarts = {"actor_starts": 0, "actor_restarts": 0}
    if already < prepared.sentences:
        actor_kwargs = {
            "model_dir": str(model_dir), "model_version": model_version, "settings": asdict(_settings(config)),
            "batch_size": config.batch_size, "device": config.device, "bf16": config.bf16,
            "num_threads": max(1, round(config.pool.cpus_per_actor)), "exit_on": exit_on_id(),
            "root": str(paths.root),
        }
        map_rows_with_actors(prepared.shards, paths, PredictActor, actor_kwargs, config.pool, config.ray,
                             config.output_format)
        restarts = actor_restarts(paths, config.pool)
    wall = time.perf_counter() - started

    rows, duplicates = _collect(paths, config.output_format)
    written_now = len(rows) - already  # distinct sentences labelled by this run
    if len(rows) != prepared.sentences:
        raise RuntimeError(f"{len(rows)} of {prepared.sentences} sentences were written; rerun the same command "
                           "to finish the rest")
    by_label = Counter(span["label"] for row in rows for span in row["spans"])
    windows = [row["windows"] for row in rows]
    summary = {
        "sentences": len(rows),
        "written_this_run": written_now,
        "duplicates_dropped": duplicates,
        "wall_seconds": wall,
        "sentences_per_second": written_now / wall if written_now and wall > 0 else None,
        "spans": sum(by_label.values()),
        "spans_by_label": dict(sorted(by_label.items())),
        "windows": sum(windows),
        "sentences_in_several_windows": sum(count > 1 for count in windows),
        "most_windows": max(windows),
        "num_actors": config.pool.num_actors,
        **restarts,
        "model": str(model_dir),
        "model_version": model_version,
        "settings": asdict(_settings(config)),
        "predictions": str(paths.result),
    }
    write_summary(paths.summary, summary)
    _print(summary)
    return summary


def _print(summary: dict[str, Any]) -> None:
    print(f"sentences            {summary['sentences']} ({summary['written_this_run']} labelled this run)")
    print(f"spans                {summary['spans']}")
    for label, count in summary["spans_by_label"].items():
        print(f"  {label:<18} {count}")
    print(f"windows              {summary['windows']} ({summary['sentences_in_several_windows']} sentences "
          f"in several, at most {summary['most_windows']})")
    if summary["sentences_per_second"] is not None:
        print(f"throughput           {summary['sentences_per_second']:.1f} sentences/s over "
              f"{summary['wall_seconds']:.1f} s")
    if summary["actor_restarts"]:
        print(f"actor restarts       {summary['actor_restarts']} (their batches were retried)")
    print(f"predictions: {summary['predictions']}")


#: ``python -m jobs.predict`` in this process (its options: jobs/cli.py); a user error is raised.
main = PREDICT.run


if __name__ == "__main__":
    raise SystemExit(commandline.main(PREDICT))
