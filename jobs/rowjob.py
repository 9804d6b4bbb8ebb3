"""The row-job pattern that jobs.annotate and jobs.synthesize share.

Prepared JSONL shards of ``{"id", "order", "record"}`` rows → ``map_batches`` into a pool of
actors (one row out per row in, same id) → JSONL/Parquet row files, with Ray Data's own
checkpointing keyed on ``id``: the same command after a crash skips every row already
written. A rerun with other settings or input is refused unless the job is restarted.

A row the LLM engine failed (an engine-error rejection: endpoint down, 5xx after retries) is
not done: the pool withholds it from its output batch, so the checkpoint never records its
id, and writes it to ``failed/`` instead, which the driver clears before each run. The rows
of ``failed/`` still reach the collected output (with whatever succeeded) and are counted;
the same command asks them again, paying only for the prompts that failed (answer cache).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

from .actor_pool import ActorPool, map_with_actor_pool
from .common import RayConfig, init_ray
from knowfree_core.annotation import engine_failed
from knowfree_core.bounds import COUNT, NON_NEGATIVE, check_bounds
from knowfree_core.errors import ConfigError

logger = logging.getLogger(__name__)

#: How a row job writes its row files.
OutputFormat = Literal["jsonl", "parquet"]


@dataclass
class PoolConfig(ActorPool):
    """The actor pool of a row job, which also reads its input shards from files."""

    #: CPUs reserved by each read task. Kept small: on a small machine a read task that
    #: waits for a whole CPU next to busy actors (and Ray Data's checkpoint filter actor)
    #: stalls the pipeline forever.
    read_cpus: float = 0.25
    #: Blocks the input is split into (default 4 per actor) so every actor gets work.
    blocks: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bounds("pool", self, {"read_cpus": NON_NEGATIVE, "blocks": COUNT})

    def cpu_slots(self) -> float:
        """The actors, one read task and the checkpoint filter actor Ray Data adds on a resume
        (capped at one in ``map_rows_with_actors``)."""
        return self.num_actors * self.cpus_per_actor + self.read_cpus + 1.0


def _under_root(name: str) -> property:
    """A read-only ``JobPaths`` attribute: ``root / name``."""
    return property(lambda paths: paths.root / name, doc=f"``root / {name!r}``")


@dataclass
class JobPaths:
    """Where a row job keeps its state, under ``root``; ``result_name`` is the collected file."""

    root: Path
    result_name: str = "annotated.jsonl"

    # Not dataclass fields (no annotation): derived from root, so they follow it.
    prepared = _under_root("input")  # the input as JSONL shards of {"id", "order", "record"}
    rows = _under_root("rows")  # what the actors wrote, JSONL or Parquet
    checkpoint = _under_root("checkpoint")  # Ray Data's record of the ids already written
    state = _under_root("job.json")  # the job's settings and input fingerprint (check_or_start)
    summary = _under_root("summary.json")
    failed = _under_root("failed")  # rows withheld for engine errors this run (withhold_failed)
    failed_list = _under_root("failed.jsonl")  # their ids and engine errors, for the user
    actor_starts = _under_root("actor_starts")  # one file per actor construction (CountingActor)

    @property
    def result(self) -> Path:
        return self.root / self.result_name


def row_schema(strings: Sequence[str], count: str) -> Any:
    """The Arrow schema of a row job's output rows: ``id`` and ``order``, the job's own string
    columns, ``rejections``, the job's count column, ``n_rejections`` and ``seconds``.

    The frame is what ``annotation.collect_output`` and the resume by ``id`` read, so it is
    written once here; built on call so that importing a job needs no pyarrow.
    """
    import pyarrow as pa

    return pa.schema(
        [("id", pa.string()), ("order", pa.int64())]
        + [(name, pa.string()) for name in strings]
        + [("rejections", pa.string()), (count, pa.int64()), ("n_rejections", pa.int64()), ("seconds", pa.float64())]
    )


def withhold_failed(table, failed_dir: str | Path):
    """``table`` without its engine-failed rows (``annotation.engine_failed``), which go to one
    new JSONL file in ``failed_dir``: rows missing from the batch are never checkpointed."""
    import pyarrow as pa

    if "rejections" not in table.column_names or table.num_rows == 0:
        return table
    failed = [engine_failed(rejections) for rejections in table.column("rejections").to_pylist()]
    if not any(failed):
        return table
    folder = Path(failed_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = uuid.uuid4().hex
    partial = folder / f".{name}.part"
    with open(partial, "w", encoding="utf-8") as handle:
        for row in table.filter(pa.array(failed)).to_pylist():
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    # Renamed into place: a killed actor leaves a .part file, never half a row to collect.
    os.replace(partial, folder / f"{name}.jsonl")
    return table.filter(pa.array([not f for f in failed]))


class CountingActor:
    """Wraps a pool actor and leaves one file per construction in ``starts_dir``: Ray Data
    restarts a crashed actor silently, and the files are how a job's summary can say how many
    restarts (and so batch retries) there were. With ``failed_dir`` it also withholds the
    rows an engine failed (:func:`withhold_failed`)."""

    def __init__(self, actor_cls: Callable[..., Any], actor_kwargs: dict[str, Any], starts_dir: str,
                 failed_dir: Optional[str] = None):
        Path(starts_dir).mkdir(parents=True, exist_ok=True)
        (Path(starts_dir) / f"{os.getpid()}-{uuid.uuid4().hex}").touch()
        self.inner = actor_cls(**actor_kwargs)
        self.failed_dir = failed_dir

    def __call__(self, table):
        out = self.inner(table)
        return withhold_failed(out, self.failed_dir) if self.failed_dir else out


def actor_restarts(paths: JobPaths, pool: PoolConfig) -> dict[str, int]:
    """Actor starts of the last run and the restarts among them (starts beyond the pool size;
    Ray Data may also start fewer actors than the pool when there is little input)."""
    starts = len(list(paths.actor_starts.iterdir())) if paths.actor_starts.exists() else 0
    return {"actor_starts": starts, "actor_restarts": max(0, starts - pool.num_actors)}


def check_or_start(paths: JobPaths, state: dict[str, Any], restart: bool, job: str = "annotation") -> None:
    """Refuse to continue another job's rows; ``restart`` discards them instead."""
    state = json.loads(json.dumps(state))  # as it reads back from job.json (tuples become lists)
    if paths.state.exists() and not restart:
        previous = json.loads(paths.state.read_text(encoding="utf-8"))
        if previous != state:
            changed = _changed_keys(previous, state)
            raise ConfigError(
                f"{paths.root} holds a{'n' if job[0] in 'aeiou' else ''} {job} job with different "
                f"{', '.join(changed)}; use a new output_dir, or --set restart=true to discard its rows"
            )
    if restart:
        for path in (paths.rows, paths.checkpoint, paths.failed):
            shutil.rmtree(path, ignore_errors=True)
        for path in (paths.result, paths.summary, paths.failed_list):
            path.unlink(missing_ok=True)
    paths.state.write_text(json.dumps(state, ensure_ascii=False, indent=1), encoding="utf-8")


def _changed_keys(previous: Any, current: Any, name: str = "") -> list[str]:
    """Dotted names of the leaves that differ between two JSON-like dicts."""
    if not isinstance(previous, dict) or not isinstance(current, dict):
        return [name or "state"] if previous != current else []
    changed: list[str] = []
    for key in sorted(set(previous) | set(current)):
        changed += _changed_keys(previous.get(key), current.get(key), f"{name}.{key}" if name else str(key))
    return changed


def count_done(rows_dir: Path) -> int:
    """Distinct ids already written: what a rerun need not do. Distinct, because a batch
    retried after a crash may be written twice, and counting its copies could hide a row that
    is still to do (one an engine failed) behind them."""
    if not rows_dir.exists():
        return 0
    ids: set[str] = set()
    for path in rows_dir.rglob("*"):
        if path.suffix == ".json":
            with open(path, encoding="utf-8") as handle:
                ids.update(json.loads(line)["id"] for line in handle if line.strip())
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            ids.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    return len(ids)


def map_rows_with_actors(
    shards: Sequence[Path],
    paths: JobPaths,
    actor: Callable[..., Any],
    actor_kwargs: dict[str, Any],
    pool: PoolConfig,
    ray_config: RayConfig,
    output_format: OutputFormat = "jsonl",
) -> None:
    """Run ``actor`` (a class whose instances map an Arrow batch to an Arrow batch with the
    same ids) over the shards into ``paths.rows``, resuming after the rows already there."""
    import ray
    from ray.data.checkpoint import CheckpointConfig

    init_ray(ray_config, min_cpus=pool.cpu_slots(), settings="pool.num_actors, pool.cpus_per_actor or pool.read_cpus")
    context = ray.data.DataContext.get_current()
    checkpoint = CheckpointConfig(
        id_column="id", checkpoint_path=str(paths.checkpoint), delete_checkpoint_on_success=False
    )
    # One filter actor, as min_cpus above counts: Ray Data's default pool grows to 10 (a CPU
    # each), and on a resume (every rerun after engine failures) the grown pool can hold the
    # slots the write tasks need, so the run waits forever.
    checkpoint.checkpoint_actor_pool_max_size = 1
    context.checkpoint_config = checkpoint
    dataset = ray.data.read_json([str(p) for p in shards], num_cpus=pool.read_cpus)
    dataset = dataset.repartition(pool.blocks or 4 * pool.num_actors)
    shutil.rmtree(paths.actor_starts, ignore_errors=True)  # count this run's starts only
    # The rows an engine failed last time are not in the checkpoint: this run asks them again.
    shutil.rmtree(paths.failed, ignore_errors=True)
    dataset = map_with_actor_pool(
        dataset,
        CountingActor,
        {"actor_cls": actor, "actor_kwargs": actor_kwargs, "starts_dir": str(paths.actor_starts),
         "failed_dir": str(paths.failed)},
        pool,
    )
    if output_format == "parquet":
        dataset.write_parquet(str(paths.rows))
    else:
        dataset.write_json(str(paths.rows), force_ascii=False)
    # The checkpoint config is process-wide: do not leave it on for the next job's dataset.
    context.checkpoint_config = None
