"""What every job shares: connecting to Ray, quietly unless the output is verbose, and writing
its summary.json.

(The jobs' command lines are in ``jobs/cli.py``.)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from knowfree_core.bounds import COUNT, check_bounds
from knowfree_core.errors import KnowFreeError
from knowfree_core.output import OutputSettings

logger = logging.getLogger(__name__)


@dataclass
class RayConfig:
    """How a job reaches Ray.

    address
        ``None``: the cluster in ``RAY_ADDRESS`` (what ``ray job submit`` sets), else a new
        local cluster started by ``ray.init()``. When a cluster ``ray start`` left running on
        this machine is found instead, ``ray.init()`` would silently join it (and refuse
        ``num_cpus``): the job stops with one line naming its address and these choices.
        ``auto``: that running cluster (or the one in ``RAY_ADDRESS``); ``local``: a new local
        cluster of this job's own, even when another is running; ``host:6379`` or
        ``ray://host:10001``: that cluster.
    num_cpus, object_store_mb
        Only for a local cluster (``None`` without a running one, or ``local``): caps for a
        shared machine (the default object store is 30% of RAM).
    wait_for_resources
        A connected cluster with fewer CPUs than the job needs at once: ``false`` fails at once,
        in one line with the numbers and the keys to lower, unless the autoscaler Ray reports
        (its cluster config, as Ray Train and Ray Data read it) can add enough; ``true`` only
        logs a warning and waits, for an autoscaler Ray does not report that way (or nodes
        about to be added by hand).
    """

    address: Optional[str] = None
    num_cpus: Optional[int] = None
    object_store_mb: Optional[int] = None
    wait_for_resources: bool = False

    def __post_init__(self) -> None:
        check_bounds("ray", self, {"num_cpus": COUNT, "object_store_mb": COUNT})


#: ``ray.address`` for a new local cluster even when one is running (``ray.init``'s own word).
LOCAL = "local"


def init_ray(config: RayConfig, min_cpus: float = 0.0,
             settings: str = "pool.num_actors or pool.cpus_per_actor") -> None:
    """Connect to the configured cluster, or start a local one.

    ``min_cpus``: the CPU slots the job's pipeline needs at once (actors, read tasks, Ray
    Data's checkpoint filter). A local cluster gets at least that many logical CPUs: with
    fewer, Ray Data waits forever for a slot that busy actors never free. On any cluster that
    cannot reach ``min_cpus`` the job would wait forever, so it fails at once naming
    ``settings`` (the config keys that lower the need): a cluster this process started
    (``ray.init()`` here, by the job or by its caller) has no autoscaler; a connected one only
    when Ray reports an autoscaler that can add enough CPUs (see
    ``RayConfig.wait_for_resources``), and then a shortfall is logged.
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
    check_cluster_size(available, min_cpus, _autoscaler_max_cpus(), config.wait_for_resources,
                       ray.get_runtime_context().gcs_address, settings)


def check_cluster_size(available: float, min_cpus: float, autoscaler_max: Optional[float], wait: bool,
                       address: str, settings: str) -> None:
    """A connected cluster of ``available`` CPUs, short of ``min_cpus``: a warning where an
    autoscaler can grow it to ``autoscaler_max`` >= ``min_cpus`` (or the user said to wait),
    else a one-line error, since the job would wait forever for slots nobody adds."""
    if autoscaler_max is not None and autoscaler_max >= min_cpus:
        logger.warning("the Ray cluster at %s has %g CPUs but this job's pipeline needs %g at once; it waits "
                       "until the autoscaler adds nodes (up to %g CPUs; lower %s)", address, available, min_cpus,
                       autoscaler_max, settings)
        return
    growth = ("and Ray reports no autoscaler that could add any" if autoscaler_max is None
              else f"and its autoscaler can grow it to {autoscaler_max:g} at most")
    if wait:
        logger.warning("the Ray cluster at %s has %g CPUs but this job's pipeline needs %g at once, %s; "
                       "waiting for more (ray.wait_for_resources)", address, available, min_cpus, growth)
        return
    raise KnowFreeError(
        f"the Ray cluster at {address} has {available:g} CPUs but this job's pipeline needs {min_cpus:g} at once, "
        f"{growth}: lower {settings}, or add nodes (ray.wait_for_resources=true waits for an autoscaler "
        f"Ray does not report)"
    )


def _autoscaler_max_cpus() -> Optional[float]:
    """The most CPUs the cluster's autoscaler may grow it to, from the cluster config the
    autoscaler reports to Ray (what Ray Train and Ray Data check themselves); None when there is
    none: a ``ray start`` cluster, or an autoscaler that does not report one."""
    from ray._private.state import state

    try:
        most = state.get_max_resources_from_cluster_config()
    except Exception as error:  # e.g. a Ray Client (ray://) driver, which has no GCS connection
        logger.debug("could not read the cluster config: %s", error)
        return None
    # None: no config; a config without CPU node groups cannot add CPUs either.
    return float(most.get("CPU", 0)) if most is not None else None


def _started_here() -> bool:
    """Whether this process started the Ray cluster (a local ``ray.init()``): its head node then
    runs in this process's session, with no autoscaler to add nodes. A driver connected to a
    running cluster holds a non-head node handle."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    return bool(getattr(node, "head", False))


def _running_local_cluster() -> Optional[str]:
    """The address of the cluster ``ray start`` last started on this machine (the one a bare
    ``ray.init()`` joins), or None. Ray's own lookup, so it finds what ``ray.init()`` would."""
    from ray._private import services

    try:
        return services.canonicalize_bootstrap_address(None)
    except (ConnectionError, ValueError):
        return None


def _start_or_connect(config: RayConfig, min_cpus: float, output: OutputSettings) -> None:
    import math

    import ray

    address = config.address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        running = _running_local_cluster()
        if running is not None:
            # ray.init() would join it and refuse num_cpus with a traceback, or, without the
            # cap, run this job on someone else's cluster: the user chooses.
            raise KnowFreeError(
                f"a Ray cluster is already running on this machine at {running} (started by `ray start`): set "
                f"ray.address=auto (or RAY_ADDRESS={running}) to run on it, or ray.address={LOCAL} to start a "
                f"separate local cluster for this job"
            )
    local = address in (None, LOCAL)
    kwargs: dict[str, Any] = {"include_dashboard": False} if local else {}
    if local:
        num_cpus = config.num_cpus if config.num_cpus is not None else os.cpu_count() or 1
        if num_cpus < min_cpus:
            logger.info("local Ray cluster: %d CPU slots for %d cores (the pipeline needs %.2f at once)",
                        math.ceil(min_cpus), num_cpus, min_cpus)
        kwargs["num_cpus"] = max(num_cpus, math.ceil(min_cpus))
        if config.object_store_mb is not None:
            kwargs["object_store_memory"] = config.object_store_mb * 1024 * 1024
    # The workers import knowfree_core; on a cluster the runtime_env (cluster/) ships it.
    # Ray's own INFO lines ("Started a local Ray instance") only when verbose; warnings stay.
    try:
        # ``local`` rather than None: a cluster started since the look-up above is not joined.
        ray.init(address=LOCAL if local else address,
                 logging_level=logging.INFO if output.verbose else logging.WARNING, **kwargs)
    except ConnectionError as error:
        # `auto` with no cluster running, a wrong address, or a cluster that wants a token
        # (Ray 2.60's `ray start` does): Ray's message and a traceback of its retries.
        hint = ("; it wants an authentication token: set RAY_AUTH_MODE=token (the token is read from "
                "~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)"
                if "InvalidAuthToken" in str(error.__cause__) else "")
        raise KnowFreeError(f"cannot connect to Ray (ray.address={address}): {error}{hint}") from error


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


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """A job's summary as ``path`` (its summary.json): UTF-8 JSON, one space of indent, Chinese
    labels as they are. It is written when the job's work is done, so a value JSON has no type
    for (a path, a date) is written as its ``str`` rather than failing the finished run."""
    path.write_text(json.dumps(summary, ensure_ascii=False, indent=1, default=str), encoding="utf-8")
