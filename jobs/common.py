"""What every job shares: connecting to Ray and a config file plus ``--set`` overrides."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

from knowfree_core.errors import KnowFreeError

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


def init_ray(config: RayConfig, min_cpus: float = 0.0) -> None:
    """Connect to the configured cluster, or start a local one.

    ``min_cpus``: the CPU slots the job's pipeline needs at once (actors, read tasks, Ray
    Data's checkpoint filter). A local cluster gets at least that many logical CPUs: with
    fewer, Ray Data waits forever for a slot that busy actors never free. On a remote
    cluster a shortfall is only logged.
    """
    import ray

    if not ray.is_initialized():
        _start_or_connect(config, min_cpus)
    available = ray.cluster_resources().get("CPU", 0.0)
    if available < min_cpus:
        logger.warning(
            "the cluster has %.2f CPUs but this job's pipeline needs %.2f at once; it may stall "
            "until the autoscaler adds nodes (lower pool.num_actors or pool.cpus_per_actor)",
            available,
            min_cpus,
        )


def _start_or_connect(config: RayConfig, min_cpus: float) -> None:
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
    ray.init(address=address, **kwargs)


def config_arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return parser


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a job's main; a user error (bad config, bad file) prints one line, exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return main(argv)
    except KnowFreeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
