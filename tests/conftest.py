"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llm_stub_server import StubLLMServer


@pytest.fixture
def llm_stub() -> Iterator[StubLLMServer]:
    """A loopback OpenAI-compatible server; set ``llm_stub.answer`` to script its replies,
    read ``llm_stub.requests`` to see what it was sent."""
    server = StubLLMServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for every job test: starting one costs seconds and every
    worker pays the torch/knowfree imports again.

    The tests' own helper modules (tests/, e.g. ``job_annotators``) go on PYTHONPATH of the
    cluster's processes themselves, not only of this driver's job: a job test that runs
    ``python -m jobs.X`` as its own driver against this cluster gets workers from the raylet's
    environment, and Ray passes a driver's working directory to them, never its PYTHONPATH.
    """
    import os
    from pathlib import Path

    ray = pytest.importorskip("ray")
    tests_dir = str(Path(__file__).resolve().parent)
    env = {
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    # vLLM's CPU settings (KV cache size, thread binding) reach the engines built in actors.
    env.update({k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU_")})
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The raylet (and every worker it starts) inherits this process's environment at init.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", tests_dir, prepend=os.pathsep)
        # Logical CPU slots, not cores: the jobs' pipelines need a few at once (see jobs.common).
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=512 * 1024**2,
                 runtime_env={"env_vars": env}, log_to_driver=False)
    yield ray
    ray.shutdown()
