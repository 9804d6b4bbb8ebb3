"""Losing a node: jobs.annotate and jobs.train on a three-node Ray cluster (``ray.cluster_utils.
Cluster``: a head and two worker nodes, each a real raylet on this machine) while the worker
node that holds their actors is killed mid-run.

The head has no CPUs, so every annotation actor and training worker runs on a worker node;
each worker node alone can hold the whole job (CPU slots, see jobs.common.init_ray), so the
job fits before and after the loss. The node is killed (SIGKILL of its raylet and the rest,
as a crashed machine) once rows are written or Ray Train has registered a checkpoint, and
always the node that holds the job's actors (read from the GCS's actor table).

A checkpoint Ray Train has not registered yet does not count for the restart: the controller
takes the workers' reports every 2 s, so a node lost within about 2 s of an epoch's report
costs that epoch (measured: lost 0.1 s after epoch 2's report, the group restarted at epoch 1).

The jobs run as subprocesses with ``RAY_ADDRESS`` set: this process starts the cluster's
nodes but never connects a driver to it (the suite's ``ray_cluster`` fixture may hold its own
in-process cluster). The cluster is not written to ``/tmp/ray/ray_current_cluster``, so other
jobs on this machine never find it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from knowfree_core.formats import read_dataset
from llm_stub_server import StubReply
from model_fixtures import tiny_run_config

pytestmark = pytest.mark.slow
pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "weibo_sample" / "train.conll"
#: Every wait is bounded: a job that hangs after the loss fails the test instead of CI.
JOB_TIMEOUT_S = 300
#: CPU slots of each worker node: either alone holds a whole job (annotation: 2 actors of 1
#: CPU, a read task, the checkpoint filter actor; training: 2 workers of 1 CPU).
WORKER_CPUS = 4


class NodeLossCluster:
    """A head without CPUs and worker nodes of ``WORKER_CPUS``, started from this process
    without connecting it; ``kill_node_running`` removes the worker node holding some actors."""

    def __init__(self, temp_dir: str, env: dict[str, str]):
        from ray.cluster_utils import Cluster

        self.temp_dir, self.env = temp_dir, env
        with self._environment() as patch:
            # Not advertised as "the cluster started last on this machine": a job elsewhere
            # with ray.address unset must not find it (jobs.common refuses to join it unasked).
            import ray._private.utils

            patch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
            self.cluster = Cluster(initialize_head=True, connect=False, head_node_args={
                "num_cpus": 0, "temp_dir": temp_dir, "include_dashboard": False,
                "object_store_memory": 150 * 1024**2,
            })

    @contextlib.contextmanager
    def _environment(self):
        """The environment every node process (and so every Ray worker) starts with."""
        with pytest.MonkeyPatch.context() as patch:
            for key, value in self.env.items():
                patch.setenv(key, value)
            patch.delenv("RAY_ADDRESS", raising=False)
            yield patch

    @property
    def address(self) -> str:
        return self.cluster.address

    def workers(self) -> list:
        return list(self.cluster.worker_nodes)

    def fill_workers(self, count: int = 2) -> None:
        """Add worker nodes until there are ``count`` (a test replaces the one it killed)."""
        while len(self.cluster.worker_nodes) < count:
            with self._environment():
                self.cluster.add_node(num_cpus=WORKER_CPUS, object_store_memory=150 * 1024**2)
        self.cluster.wait_for_nodes(timeout=60)

    def alive_actors(self, class_name_part: str) -> list[dict]:
        table = self.cluster.global_state.actor_table(None)
        return [a for a in table.values() if a["State"] == "ALIVE" and class_name_part in a["ActorClassName"]]

    def kill_node_running(self, class_name_part: str):
        """Kill (no graceful shutdown) the worker node that holds the most live actors whose
        class name holds ``class_name_part``; returns it with the actors it held."""
        actors = self.alive_actors(class_name_part)
        by_node = {node.node_id: [a for a in actors if a["Address"]["NodeID"] == node.node_id]
                   for node in self.workers()}
        node_id, held = max(by_node.items(), key=lambda item: len(item[1]))
        assert held, f"no live {class_name_part} actor on a worker node: {actors}"
        node = next(n for n in self.workers() if n.node_id == node_id)
        self.cluster.remove_node(node, allow_graceful=False)
        return node, held

    def close(self) -> None:
        # Not Cluster.shutdown(): it also resets this process's internal KV client (the
        # ray_cluster fixture's, when it runs) and deletes /tmp/ray/ray_current_cluster,
        # which belongs to whatever else runs on this machine.
        for node in self.workers():
            self.cluster.remove_node(node, allow_graceful=False)
        if self.cluster.head_node is not None:
            self.cluster.remove_node(self.cluster.head_node, allow_graceful=False)


@pytest.fixture(scope="module")
def node_loss_cluster():
    # Short: Ray's socket paths under it must stay within 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="kfnodes-", dir="/tmp")
    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        # As this process already is: token mode when the ray_cluster fixture's ray.init turned
        # it on here (its token is then in ~/.ray/auth_token), else none.
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
    }
    cluster = NodeLossCluster(temp_dir, env)
    try:
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _start_job(cluster: NodeLossCluster, module: str, args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, **cluster.env, "RAY_ADDRESS": cluster.address}
    handle = open(log, "w", encoding="utf-8")
    try:
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        handle.close()


def _wait_for(process: subprocess.Popen, log: Path, ready, what: str, timeout: float = JOB_TIMEOUT_S) -> None:
    """Poll until ``ready()``; fail (killing the job) when the job ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"the job ended (exit {process.returncode}) before {what}: "
                        f"{log.read_text(encoding='utf-8')[-3000:]}")
        if time.monotonic() > deadline:
            _kill(process)
            pytest.fail(f"no {what} within {timeout:g} s: {log.read_text(encoding='utf-8')[-3000:]}")
        time.sleep(0.1)


def _finish(process: subprocess.Popen, log: Path, timeout: float = JOB_TIMEOUT_S) -> str:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(process)
        pytest.fail(f"the job did not finish within {timeout:g} s after the node loss: "
                    f"{log.read_text(encoding='utf-8')[-3000:]}")
    output = log.read_text(encoding="utf-8")
    assert process.returncode == 0, output[-4000:]
    return output


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, 9)
    except ProcessLookupError:
        pass
    process.wait()


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_annotation_survives_losing_the_node_of_an_actor(node_loss_cluster, llm_stub, tmp_path):
    """An LLM annotation (openai engine, a loopback server answering in 0.1 s, one request at a
    time per actor): the worker node of one of the two pool actors dies after the first rows
    are written. Ray restarts the actor on the other node and retries its batches; every input
    id is in annotated.jsonl exactly once and the summary counts the restart."""
    cluster = node_loss_cluster
    cluster.fill_workers()

    def answer(request):
        if request.prompt_text == "ping":
            return "pong"
        sentence = request.prompt_text.rsplit("输入：", 1)[-1].strip()
        if "命名实体" in request.prompt_text:
            return StubReply(json.dumps([{"entity": sentence[:2], "type": "测试"}], ensure_ascii=False), delay_s=0.1)
        return StubReply(json.dumps([sentence[:1]], ensure_ascii=False), delay_s=0.1)

    llm_stub.answer = answer
    output_dir = tmp_path / "job"
    settings = [
        f"input=[{SAMPLE}]", f"output_dir={output_dir}", "annotator=llm", "steps=[ent,seg]",
        "llm.engine.kind=openai", "llm.engine.model=stub", f"llm.engine.base_url={llm_stub.base_url}",
        "llm.engine.max_concurrency=1", "llm.engine.max_retries=0",
        "pool.num_actors=2", "pool.cpus_per_actor=1", "pool.batch_size=8",
    ]
    log = tmp_path / "annotate.log"
    started = time.monotonic()
    process = _start_job(cluster, "jobs.annotate", [a for s in settings for a in ("--set", s)], log)
    rows = output_dir / "rows"
    _wait_for(process, log, lambda: rows.is_dir() and any(p.suffix == ".json" for p in rows.iterdir()),
              "written rows")
    node, held = cluster.kill_node_running("CountingActor")
    lost_at = time.monotonic() - started
    output = _finish(process, log)
    summary = json.loads((output_dir / "summary.json").read_text(encoding="utf-8"))
    print(f"annotation: node lost at {lost_at:.1f} s with {len(held)} actor(s); job done at "
          f"{time.monotonic() - started:.1f} s; {summary['actor_restarts']} actor restart(s), "
          f"{summary['duplicates_dropped']} duplicate row(s) dropped")

    expected = [s.id for s in read_dataset(SAMPLE)]
    ids = _ids(output_dir / "annotated.jsonl")
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids)) == 150, output[-3000:]
    assert summary["sentences"] == 150 and summary["engine_failed_rows"] == 0
    assert summary["spans_by_source"]["llm:ent"] >= 150
    # the actors of the lost node started again elsewhere: the summary counts the restarts
    assert summary["actor_restarts"] >= len(held), summary
    assert summary["actor_starts"] == 2 + summary["actor_restarts"]


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text(encoding="utf-8").splitlines()]


def _registered_epoch(run_storage: Path) -> int:
    """The epoch of the newest checkpoint Ray Train has registered (0: none yet). A checkpoint
    counts for a restart once the controller has taken its report, which it polls every 2 s
    (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): it then writes checkpoint_manager_snapshot.json."""
    try:
        snapshot = json.loads((run_storage / "checkpoint_manager_snapshot.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not there yet, or caught while being written
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("epoch", 0))


def test_training_survives_losing_the_node_of_its_workers(node_loss_cluster, tmp_path):
    """jobs.train, 2 workers, --max-failures 1: the worker node holding both training workers
    dies once Ray Train has registered a checkpoint. Ray Train restarts the worker group on
    the other node from that checkpoint: no epoch runs twice, the losses are the undisturbed
    run's, and metrics.json has the undisturbed run's keys."""
    cluster = node_loss_cluster
    cluster.fill_workers()
    epochs = 6
    config = {
        **tiny_run_config(tmp_path, encoder_lr=1e-3, head_lr=3e-3, epochs=epochs),
        "ray_train": {"num_workers": 2, "resources_per_worker": {"CPU": 1}, "num_to_keep": 2},
    }
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")

    def train(run_dir: Path, log: Path) -> subprocess.Popen:
        return _start_job(cluster, "jobs.train", ["--config", str(config_file), "--set", f"output_dir={run_dir}",
                                                  "--max-failures", "1"], log)

    straight_dir, straight_log = tmp_path / "straight", tmp_path / "straight.log"
    started = time.monotonic()
    _finish(train(straight_dir, straight_log), straight_log)
    straight_s = time.monotonic() - started

    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    started = time.monotonic()
    process = train(run_dir, log)
    run_storage = run_dir / "ray_train" / run_dir.name
    _wait_for(process, log, lambda: _registered_epoch(run_storage) >= 1, "a registered training checkpoint")
    node, held = cluster.kill_node_running("RayTrainWorker")
    registered = _registered_epoch(run_storage)
    lost_at = time.monotonic() - started
    output = _finish(process, log)
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    print(f"training: undisturbed {straight_s:.1f} s; node lost at {lost_at:.1f} s with {len(held)} worker(s), "
          f"epoch {registered} registered; job done at {time.monotonic() - started:.1f} s, resumed after epoch "
          f"{metrics['ray_train']['resumed_after_epoch']}")

    expected = json.loads((straight_dir / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics) == set(expected) and set(metrics["ray_train"]) == set(expected["ray_train"])
    assert expected["ray_train"]["resumed_after_epoch"] == 0
    # the restart began after the registered checkpoint (or a later one), not from scratch
    assert registered <= metrics["ray_train"]["resumed_after_epoch"] < epochs, output[-3000:]
    assert "[FailurePolicy] RETRY" in output  # the worker group did fail and restart
    history, straight = _history(run_dir), _history(straight_dir)
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))  # each epoch exactly once
    assert [r["train_loss"] for r in history] == pytest.approx([r["train_loss"] for r in straight])
    assert metrics["best_epoch"] == expected["best_epoch"]
