"""What every job shares: connecting to Ray, quietly unless the output is verbose.

(The jobs' command lines are in ``jobs/cli.py``.)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

from knowfree_core.bounds import COUNT, check_bounds
from knowfree_core.errors import KnowFreeError
from knowfree_core.output import OutputSettings

logger = logging.getLogger(__name__)


@dataclass
class RayConfig:
    """How a job reaches Ray.

    address
        ``None``: the cluster in ``RAY_ADDRESS`` (what ``ray job submit`` sets), else a
        local cluster started by ``ray.init()``; ``auto`` or ``ray://host:10001`` otherwise.
    num_cpus, object_store_mb
        Only for a local cluster: caps for a shared machine (the default object store is 30%
        of RAM).
    """

    address: Optional[str] = None
    num_cpus: Optional[int] = None
    object_store_mb: Optional[int] = None

    def __post_init__(self) -> None:
        check_bounds("ray", self, {"num_cpus": COUNT, "object_store_mb": COUNT})


def init_ray(config: RayConfig, min_cpus: float = 0.0,
             settings: str = "pool.num_actors or pool.cpus_per_actor") -> None:
    """Connect to the configured cluster, or start a local one.

    ``min_cpus``: the CPU slots the job's pipeline needs at once (actors, read tasks, Ray
    Data's checkpoint filter). A local cluster gets at least that many logical CPUs: with
    fewer, Ray Data waits forever for a slot that busy actors never free. A cluster this
    process started (``ray.init()`` here, by the job or by its caller) has no autoscaler: a
    shortfall there would hang, so it fails at once naming ``settings`` (the config keys that
    lower the need). On a connected cluster an autoscaler may add nodes: a shortfall is only
    logged.
    """
    try:
        import ray
    except ImportError as error:  # ray is an extra: knowfree train and friends run without it
        raise KnowFreeError(f"this job needs Ray: pip install 'knowfree[ray]' ({error})") from error

    output = OutputSettings.from_environment()
    if not ray.is_initialized():
        _start_or_connect(config, min_cpus, output)
    _quiet_ray_data(output)
    available = ray.cluster_resources().get("CPU", 0.0)
    if available >= min_cpus:
        return
    if _started_here():
        raise KnowFreeError(
            f"the local Ray cluster has {available:g} CPUs but this job's pipeline needs {min_cpus:g} at "
            f"once, and no autoscaler can add any: lower {settings}, or give the cluster more "
            f"(ray.num_cpus when the job starts it)"
        )
    logger.warning(
        "the cluster has %.2f CPUs but this job's pipeline needs %.2f at once; it may stall "
        "until the autoscaler adds nodes (lower %s)",
        available,
        min_cpus,
        settings,
    )


def _started_here() -> bool:
    """Whether this process started the Ray cluster (a local ``ray.init()``): its head node then
    runs in this process's session, with no autoscaler to add nodes. A driver connected to a
    running cluster holds a non-head node handle."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    return bool(getattr(node, "head", False))


def _start_or_connect(config: RayConfig, min_cpus: float, output: OutputSettings) -> None:
    import math

    import ray

    address = config.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"include_dashboard": False} if not address else {}
    if not address:
        num_cpus = config.num_cpus if config.num_cpus is not None else os.cpu_count() or 1
        if num_cpus < min_cpus:
            logger.info("local Ray cluster: %d CPU slots for %d cores (the pipeline needs %.2f at once)",
                        math.ceil(min_cpus), num_cpus, min_cpus)
        kwargs["num_cpus"] = max(num_cpus, math.ceil(min_cpus))
        if config.object_store_mb is not None:
            kwargs["object_store_memory"] = config.object_store_mb * 1024 * 1024
    # The workers import knowfree_core; on a cluster the runtime_env (cluster/) ships it.
    # Ray's own INFO lines ("Started a local Ray instance") only when verbose; warnings stay.
    ray.init(address=address, logging_level=logging.INFO if output.verbose else logging.WARNING, **kwargs)


def _quiet_ray_data(output: OutputSettings) -> None:
    """Ray Data's progress (bars in a terminal, a block of status lines every few seconds in a
    log) and its INFO lines only when verbose; its warnings stay. The executor runs in this
    process (the driver): its settings here are the ones that count."""
    if output.verbose:
        return
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Turning the bars off logs a warning that says how to turn them on again: --verbose does.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
