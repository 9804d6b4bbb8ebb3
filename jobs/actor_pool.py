"""Arrow batches of a Ray dataset through a pool of actors, each holding one heavy object."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from knowfree_core.bounds import COUNT, NON_NEGATIVE, check_bounds


@dataclass
class ActorPool:
    """A Ray Data actor pool (``map_batches`` with an ``ActorPoolStrategy``). One actor holds
    one heavy object (an LLM engine, a LAC model, a KnowFREE model, an embedding model) and
    serves batches of rows."""

    num_actors: int = 2
    batch_size: int = 64
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    #: Memory each actor reserves (MiB; Ray's ``memory`` resource), so that Ray places no more
    #: actors on a node than its memory holds. None reserves nothing. A KnowFREE model actor
    #: takes about 2.5 GiB on the CPU (e5 base): without a reservation Ray Data warns every
    #: 30 s that the operator "uses 2.5GiB of memory per worker" and suggests ``memory=``.
    memory_mb: Optional[int] = None

    def __post_init__(self) -> None:
        # num_actors=0 or batch_size=-1 would otherwise surface as a Ray Data traceback.
        check_bounds("pool", self, {"num_actors": COUNT, "batch_size": COUNT, "memory_mb": COUNT,
                                    "cpus_per_actor": NON_NEGATIVE, "gpus_per_actor": NON_NEGATIVE})

    def cpu_slots(self) -> float:
        """The CPU slots the pool's job needs at once (``init_ray``'s ``min_cpus``): the actors,
        plus half a slot for the tasks that read and write beside them."""
        return self.num_actors * self.cpus_per_actor + 0.5


def map_with_actor_pool(dataset: Any, actor: Callable[..., Any], constructor_kwargs: dict[str, Any],
                        pool: ActorPool) -> Any:
    """``dataset.map_batches`` through ``pool.num_actors`` instances of ``actor`` (built with
    ``constructor_kwargs``), which map a ``pyarrow.Table`` to a ``pyarrow.Table``.

    Ray Data restarts a crashed actor and retries its batch by default (max_restarts=-1,
    max_task_retries=-1): no row is lost with it.
    """
    import ray

    return dataset.map_batches(
        actor,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=pool.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool.num_actors),
        num_cpus=pool.cpus_per_actor,
        num_gpus=pool.gpus_per_actor or None,
        **({"memory": pool.memory_mb * 1024**2} if pool.memory_mb else {}),
    )
