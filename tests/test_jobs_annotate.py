"""jobs.annotate end to end on a local Ray cluster: every sentence annotated exactly once,
through an actor crash, a killed driver and a rerun; changed settings are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from knowfree_core.errors import ConfigError, KnowFreeError
from knowfree_core.formats import read_dataset
from llm_stub_server import StubReply

pytest.importorskip("ray")
from jobs.annotate import annotator_names, load_job_config, run_annotation  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "weibo_sample" / "train.conll"


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


def _config(tmp_path: Path, *overrides: str):
    return load_job_config(
        None,
        [f"input=[{SAMPLE}]", f"output_dir={tmp_path / 'job'}", "pool.num_actors=2", "pool.cpus_per_actor=0.5",
         "pool.batch_size=8", *overrides],
    )


def test_lac_job_annotates_every_sentence_in_input_order(ray_cluster, tmp_path):
    summary = run_annotation(_config(tmp_path, "steps=[ent,seg]"))
    expected = [s.id for s in read_dataset(SAMPLE)]
    annotated = tmp_path / "job" / "annotated.jsonl"
    assert _ids(annotated) == expected
    assert summary["sentences"] == len(expected) and summary["duplicates_dropped"] == 0
    assert set(summary["spans_by_source"]) == {"lac:ent", "lac:seg"}
    # what knowfree train reads: the same sentences, target spans kept, extension spans added
    sentences = read_dataset(annotated)
    assert [s.spans for s in sentences] == [s.spans for s in read_dataset(SAMPLE)]
    assert all(s.extension_spans for s in sentences)

    # the same command again does no work and keeps the output
    again = run_annotation(_config(tmp_path, "steps=[ent,seg]"))
    assert again["written_this_run"] == 0 and _ids(annotated) == expected

    # different settings on the same folder are refused, naming what changed
    with pytest.raises(ConfigError, match="settings"):
        run_annotation(_config(tmp_path, "steps=[seg]"))


def test_killed_actor_loses_no_record_and_duplicates_none(ray_cluster, tmp_path):
    marker = tmp_path / "died"
    config = _config(
        tmp_path,
        "annotator=job_annotators:FirstCharAnnotator",
        "steps=[seg]",
        "annotator_options.die_on=train-77",
        f"annotator_options.marker={marker}",
    )
    summary = run_annotation(config)
    assert marker.exists(), "the actor was supposed to die once"
    ids = _ids(tmp_path / "job" / "annotated.jsonl")
    assert len(ids) == len(set(ids)) == 150 and summary["duplicates_dropped"] == 0
    assert summary["spans_by_source"] == {"first:seg": 150}
    # the summary says the pool lost an actor and retried its batch
    assert summary["actor_restarts"] >= 1


def test_killed_driver_resumes_without_redoing_written_rows(ray_cluster, tmp_path):
    """The job process dies (SIGKILL) after some rows are written; the same command then
    finishes the rest, skipping written rows through Ray Data's checkpoint."""
    overrides = [
        "annotator=job_annotators:FirstCharAnnotator", "steps=[seg]", "annotator_options.sleep_s=0.1",
        f"ray.address={ray_cluster.get_runtime_context().gcs_address}",
    ]
    config = _config(tmp_path, *overrides)
    command = [sys.executable, "-m", "jobs.annotate", *[f"--set={o}" for o in (
        f"input=[{SAMPLE}]", f"output_dir={config.output_dir}", "pool.num_actors=2", "pool.cpus_per_actor=0.5",
        "pool.batch_size=8", *overrides)]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Ray Data commits a block in two phases (a pending record, the rows, the record):
    # wait until one block is committed.
    checkpoint = Path(config.output_dir) / "checkpoint"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoint.exists() and any(
            p.is_file() and not p.name.endswith(".pending.parquet") for p in checkpoint.rglob("*")
        ):
            break
        time.sleep(0.2)
    assert process.poll() is None, "the job finished before it could be killed; slow it down"
    process.send_signal(signal.SIGKILL)
    process.wait()

    summary = run_annotation(config)
    ids = _ids(Path(config.output_dir) / "annotated.jsonl")
    assert ids == [s.id for s in read_dataset(SAMPLE)]
    # rows of a block caught between its two phases are deleted and written again
    assert summary["duplicates_dropped"] == 0
    assert 0 < summary["written_this_run"] < 150, "the rerun should skip the rows recorded before the kill"
    # the killed run's rows were annotated too, not recorded as failures (its workers found
    # the annotator's module)
    assert summary["rejections_by_reason"] == {} and summary["spans_by_source"] == {"first:seg": 150}


def test_llm_job_against_an_openai_compatible_server(ray_cluster, llm_stub, tmp_path):
    """The LLM engine configured in the job's YAML keys reaches the server from the actors;
    raw answers, prompt versions and rejections land in the output rows."""
    def answer(request):
        prompt = request.prompt_text
        sentence = prompt.rsplit("输入：", 1)[-1].strip()
        if "命名实体" in prompt:
            return json.dumps([{"entity": sentence[:2], "type": "测试"}], ensure_ascii=False)
        return "抱歉，我无法回答"  # P_seg: garbage, counted as a rejection

    llm_stub.answer = answer
    config = _config(
        tmp_path, "annotator=llm", "steps=[ent,seg]", "llm.engine.kind=openai", "llm.engine.model=stub",
        f"llm.engine.base_url={llm_stub.base_url}", "llm.engine.max_retries=0",
        "llm.engine.price_per_million.input=0.5", "llm.engine.price_per_million.output=2",
        "llm.engine.cost_projection_sentences=2000",
    )
    summary = run_annotation(config)
    assert summary["sentences"] == 150
    # the token ledger: the server's usage per step, summed over the rows (the access check's
    # "ping" is no prompt of the run)
    by_step = summary["tokens"]["by_step"]
    for step, marker in (("ent", "命名实体"), ("seg", "分词")):
        usage = [r.usage for r in llm_stub.requests if r.prompt_text != "ping" and marker in r.prompt_text]
        # the sample repeats a few sentences: asked once, their copies count as cached
        assert by_step[step] == {"prompt_version": f"{step}-zh-v2", "prompt_tokens": sum(u["prompt_tokens"] for u in usage),
                                 "completion_tokens": sum(u["completion_tokens"] for u in usage),
                                 "requests": len(usage), "cached": 150 - len(usage)}
    prompt = sum(s["prompt_tokens"] for s in by_step.values())
    completion = sum(s["completion_tokens"] for s in by_step.values())
    # every answer asked anew: per step, the copies at the step's mean (the steps' request counts
    # may differ: a repeated sentence in two actors' batches at once is asked by both)
    per_1000 = summary["tokens"]["per_1000_sentences"]
    expected = sum(t["prompt_tokens"] / t["requests"] * (t["requests"] + t["cached"]) / 150 * 1000
                   for t in by_step.values())
    assert per_1000["prompt_tokens"] == pytest.approx(expected, abs=0.1)
    assert summary["cost"]["run"] == pytest.approx((prompt * 0.5 + completion * 2) / 1e6, abs=1e-6)
    assert summary["cost"]["projected"]["sentences"] == 2000
    assert summary["cost"]["projected"]["cost"] == pytest.approx(2 * summary["cost"]["per_1000_sentences"], abs=0.01)
    written = json.loads((tmp_path / "job" / "summary.json").read_text(encoding="utf-8"))
    assert written["tokens"] == summary["tokens"] and written["cost"] == summary["cost"]
    assert summary["spans_by_source"]["llm:ent"] >= 150
    # every garbage segmentation answer is a counted rejection, not a crash
    assert sum(n for reason, n in summary["rejections_by_reason"].items() if reason.startswith("seg:")) >= 150
    rows_file = next((tmp_path / "job" / "rows").glob("*.json"))
    row = json.loads(rows_file.read_text(encoding="utf-8").splitlines()[0])
    assert json.loads(row["prompt_versions"]) == {"ent": "ent-zh-v2", "seg": "seg-zh-v2"}
    assert "测试" in json.loads(row["raw_answers"])["ent"]
    # every answer was cached: the same job elsewhere pays nothing but its 1-token access check
    def prompts_sent():
        return [r for r in llm_stub.requests if r.prompt_text != "ping"]

    requests = len(prompts_sent())
    config.output_dir = str(tmp_path / "job2")
    config.llm.cache = str(tmp_path / "job" / "answers.sqlite")
    again = run_annotation(config)
    assert len(prompts_sent()) == requests
    # served from the cache: no new tokens, every answer counted as cached, nothing to price
    assert {step: (s["prompt_tokens"], s["completion_tokens"], s["requests"], s["cached"])
            for step, s in again["tokens"]["by_step"].items()} == {"ent": (0, 0, 0, 150), "seg": (0, 0, 0, 150)}
    assert again["cost"]["run"] == 0 and again["cost"]["per_1000_sentences"] is None


def _first_sentences(tmp_path: Path, count: int) -> Path:
    path = tmp_path / f"first{count}.jsonl"
    lines = [json.dumps(s.to_dict(), ensure_ascii=False) for s in read_dataset(SAMPLE)[:count]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_two_annotators_run_in_turn_and_keep_their_sources(ray_cluster, tmp_path):
    summary = run_annotation(_config(tmp_path, "annotators=[lac,jieba]", "steps=[ent,seg,pos]"))
    sources = {f"{tool}:{step}" for tool in ("lac", "jieba") for step in ("ent", "seg", "pos")}
    assert set(summary["spans_by_source"]) == sources
    assert summary["annotator"] == "lac+jieba" and summary["annotators"] == ["lac", "jieba"]
    assert summary["sentences"] == 150 and summary["duplicates_dropped"] == 0
    annotated = read_dataset(tmp_path / "job" / "annotated.jsonl")
    assert {e.source for s in annotated for e in s.extension_spans} == sources
    # per source, the summary counts what annotated.jsonl holds
    counted: dict[str, int] = {}
    for sentence in annotated:
        for span in sentence.extension_spans:
            counted[span.source] = counted.get(span.source, 0) + 1
    assert counted == summary["spans_by_source"]
    # the same label from both tools is one label name, in two sources (ablations drop one)
    first = annotated[0]
    assert {e.source for e in first.extension_spans if e.label == "SEG"} == {"lac:seg", "jieba:seg"}
    # every row says which annotators ran and which of them rejected what
    rows_file = next((tmp_path / "job" / "rows").glob("*.json"))
    row = json.loads(rows_file.read_text(encoding="utf-8").splitlines()[0])
    assert row["annotator"] == "lac+jieba"
    assert all(r["annotator"] in ("lac", "jieba") for r in json.loads(row["rejections"]))


def test_a_changed_annotator_list_is_refused_without_restart(ray_cluster, tmp_path):
    small = _first_sentences(tmp_path, 4)
    common = [f"input=[{small}]", "pool.num_actors=1", "steps=[seg]"]
    first = run_annotation(_config(tmp_path, *common, "annotators=[lac,jieba]"))
    assert set(first["spans_by_source"]) == {"lac:seg", "jieba:seg"}
    # the same list again resumes (nothing to do); another list, or another order, is refused
    assert run_annotation(_config(tmp_path, *common, "annotators=[lac,jieba]"))["written_this_run"] == 0
    for changed in ("annotators=[lac]", "annotators=[jieba,lac]"):
        with pytest.raises(ConfigError, match="annotators"):
            run_annotation(_config(tmp_path, *common, changed))
    # options are per annotator; a change of them is refused too
    with pytest.raises(ConfigError, match="annotator_options"):
        run_annotation(_config(tmp_path, *common, "annotators=[lac,jieba]", "annotator_options.jieba.hmm=false"))
    again = run_annotation(_config(tmp_path, *common, "annotators=[lac]", "restart=true"))
    assert set(again["spans_by_source"]) == {"lac:seg"} and again["written_this_run"] == 4


def test_annotator_list_options_are_checked_before_any_work(tmp_path):
    def names(*overrides):
        return annotator_names(_config(tmp_path, *overrides))

    assert names() == ["lac"] and names("annotators=[lac,jieba]", "annotator=llm") == ["lac", "jieba"]
    with pytest.raises(ConfigError, match="twice"):
        names("annotators=[lac,lac]")
    with pytest.raises(ConfigError, match="maps each annotator's name"):
        names("annotators=[lac,knowfree]", "annotator_options.model=/some/model")
    with pytest.raises(ConfigError, match="llm section"):
        names("annotators=[lac,llm]", "annotator_options.llm.language=en")


def test_a_pipeline_annotate_section_with_annotators_passes_through(tmp_path, monkeypatch):
    """jobs.pipeline fills in ``annotator`` (the train config's first annotator) and hands its
    ``annotate:`` section to AnnotateJobConfig: the list wins."""
    import jobs.pipeline as pipeline
    from jobs.annotate import annotator_specs
    from knowfree_core.config import KnowFreeConfig

    captured = []
    monkeypatch.setattr(pipeline, "run_annotation", lambda config: captured.append(config) or {})
    config = pipeline.PipelineConfig(
        train_config="unused.yaml", output_dir=str(tmp_path),
        annotate=pipeline.AnnotateStage(annotators=["lac", "jieba"], annotator_options={"jieba": {"hmm": False}}),
    )
    pipeline.Cell(config, KnowFreeConfig(), tmp_path).annotate(SAMPLE, tmp_path / "annotate")
    (job,) = captured
    specs = annotator_specs(job)
    assert [(s.name, s.options) for s in specs] == [("lac", {}), ("jieba", {"hmm": False})]
    assert job.annotator == "lac"  # filled in by the pipeline, ignored with a list


def test_a_knowfree_model_annotates_in_the_actor_pool_next_to_jieba(ray_cluster, tmp_path):
    """The knowfree annotator built inside Ray actors from its spec; it runs only ``ent`` of
    the job's steps, jieba all of them."""
    from knowfree_core.config import TrainConfig
    from knowfree_core.formats import write_dataset
    from knowfree_core.training import fit

    from model_fixtures import build_tiny_model, make_random_encoder, tiny_corpus

    train = tiny_corpus(24, seed=1, with_extensions=False)
    model = build_tiny_model(make_random_encoder(tmp_path / "encoder"), train)
    fit(model, train, None, TrainConfig(epochs=6, batch_size=8, encoder_lr=1e-3, head_lr=3e-3, warmup_ratio=0.0,
                                        seed=13), progress=False)
    model_dir = model.save_pretrained(tmp_path / "model")
    sentences = tiny_corpus(12, seed=7, prefix="q", with_extensions=False)
    write_dataset(sentences, tmp_path / "input.jsonl")

    summary = run_annotation(_config(
        tmp_path, f"input=[{tmp_path / 'input.jsonl'}]", "pool.num_actors=1", "pool.batch_size=5",
        "annotators=[jieba,knowfree]", f"annotator_options.knowfree.model={model_dir}",
        "annotator_options.knowfree.corpus=tiny", "annotator_options.knowfree.batch_size=4",
    ))
    assert summary["steps_by_annotator"] == {"jieba": ["ent", "seg", "pos"], "knowfree": ["ent"]}
    expected = sum(map(len, model.predict(sentences)))
    assert expected > 0 and summary["spans_by_source"]["tiny:ent"] == expected
    assert summary["rejections"] == 0
    annotated = read_dataset(tmp_path / "job" / "annotated.jsonl")
    labels = {e.label for s in annotated for e in s.extension_spans if e.source == "tiny:ent"}
    assert labels and labels <= {"ENT-tiny.PER", "ENT-tiny.LOC"}


def test_an_llm_in_the_list_runs_next_to_an_offline_tool(ray_cluster, llm_stub, tmp_path):
    """``llm`` in ``annotators`` takes its settings from ``llm:``; its raw answers and prompt
    versions are keyed ``llm/<step>`` beside the other annotators' output."""
    llm_stub.answer = lambda request: json.dumps(
        [{"entity": request.prompt_text.rsplit("输入：", 1)[-1].strip()[:2], "type": "测试"}], ensure_ascii=False)
    small = _first_sentences(tmp_path, 4)
    summary = run_annotation(_config(
        tmp_path, f"input=[{small}]", "pool.num_actors=1", "annotators=[lac,llm]", "steps=[ent]",
        "llm.engine.kind=openai", "llm.engine.model=stub", f"llm.engine.base_url={llm_stub.base_url}",
        "llm.engine.max_retries=0",
    ))
    assert set(summary["spans_by_source"]) == {"lac:ent", "llm:ent"} and summary["spans_by_source"]["llm:ent"] >= 4
    row = json.loads(next((tmp_path / "job" / "rows").glob("*.json")).read_text(encoding="utf-8").splitlines()[0])
    assert json.loads(row["prompt_versions"]) == {"llm/ent": "ent-zh-v2"}
    assert "测试" in json.loads(row["raw_answers"])["llm/ent"]


def test_a_plugin_that_is_no_annotator_is_a_one_line_error_and_never_runs(tmp_path, capsys):
    from jobs.cli import ANNOTATE
    from knowfree_core.commandline import main

    marker = tmp_path / "ran"
    code = main(ANNOTATE, ["--set", f"input=[{SAMPLE}]", "--set", f"output_dir={tmp_path / 'job'}",
                 "--set", "annotator=os:system", "--set", f"annotator_options.command=touch {marker}"])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    assert err.count("\n") == 1 and "annotator: 'os:system' is not a subclass" in err and "Traceback" not in err


def test_a_pool_larger_than_a_fixed_local_cluster_fails_at_once(tmp_path):
    """A local ray.init() cluster (no autoscaler) of 1 CPU and a pool needing 2 actors of 1 CPU:
    the job must not wait forever for slots; it fails with one line naming the keys to lower."""
    script = (
        "import sys, ray\n"
        "ray.init(num_cpus=1, include_dashboard=False, object_store_memory=128 * 1024**2, log_to_driver=False)\n"
        "from knowfree_core import commandline\n"
        "from jobs.cli import ANNOTATE\n"
        "sys.exit(commandline.main(ANNOTATE, sys.argv[1:]))\n"
    )
    overrides = [f"input=[{SAMPLE}]", f"output_dir={tmp_path / 'job'}", "steps=[seg]",
                 "annotator=job_annotators:FirstCharAnnotator", "pool.num_actors=2", "pool.cpus_per_actor=1"]
    command = [sys.executable, "-c", script] + [arg for value in overrides for arg in ("--set", value)]
    tests_dir = str(REPO / "tests")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO), tests_dir, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(errors) == 1 and "needs 3.25 at once" in errors[0] and "pool.num_actors" in errors[0], done.stderr[-2000:]
    assert "has 1 CPUs" in errors[0]
    assert not (tmp_path / "job" / "annotated.jsonl").exists()


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:  # bound together, so the ports differ
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _stop_session(process: subprocess.Popen) -> None:
    """Stop a `ray start --block` started in a session of its own, and every process of that
    session (its GCS, raylet, workers), by id: `ray stop` would stop every cluster on the machine."""
    process.terminate()  # --block shuts its cluster down on SIGTERM
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    listed = subprocess.run(["ps", "-o", "pid=", "-s", str(process.pid)], capture_output=True, text=True)
    for pid in (int(p) for p in listed.stdout.split()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def ray_start_head():
    """A `ray start --head --num-cpus 1` cluster, as a user leaves one running: (its address, the
    environment of a shell on this machine). Its own RAY_TMPDIR holds the "last started cluster"
    file a bare ray.init() reads, so this cluster and the other clusters of the machine never
    meet; its own ports too."""
    import shutil
    import tempfile

    # Short: Ray's socket paths under it must stay within 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="kfray-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    port, client, dashboard, agent, agent_grpc = _free_ports(5)
    log = open(ray_tmp / "ray-start.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus", "1",
         "--port", str(port), "--ray-client-server-port", str(client), "--dashboard-port", str(dashboard),
         "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--include-dashboard=false", "--object-store-memory", str(100 * 1024**2)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address_file = ray_tmp / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + 90
        while not address_file.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert address_file.exists(), (ray_tmp / "ray-start.log").read_text()[-2000:]
        yield address_file.read_text().strip(), env
    finally:
        _stop_session(process)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _annotate_command(tmp_path: Path, *overrides: str) -> list[str]:
    settings = [f"input=[{SAMPLE}]", f"output_dir={tmp_path / 'job'}", "steps=[seg]",
                "annotator=job_annotators:FirstCharAnnotator", *overrides]
    return [sys.executable, "-m", "jobs.annotate"] + [arg for value in settings for arg in ("--set", value)]


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    return errors[0]


def test_a_fixed_cluster_too_small_for_the_pool_fails_at_once(ray_start_head, tmp_path):
    """A cluster the job connects to (RAY_ADDRESS) of 1 CPU and no autoscaler, and a pool
    needing 3.25 at once (default pool): the job used to log "may stall until the autoscaler
    adds nodes" and wait forever; Ray reports no autoscaler, so it fails in one line."""
    address, env = ray_start_head
    started = time.monotonic()
    done = subprocess.run(_annotate_command(tmp_path), cwd=REPO, env={**env, "RAY_ADDRESS": address},
                          capture_output=True, text=True, timeout=120)
    error = _one_error_line(done)
    assert time.monotonic() - started < 45
    assert f"the Ray cluster at {address} has 1 CPUs" in error and "needs 3.25 at once" in error, error
    assert "reports no autoscaler" in error and "pool.num_actors" in error and "ray.wait_for_resources" in error
    assert not (tmp_path / "job" / "annotated.jsonl").exists()


def test_a_cluster_left_running_is_not_joined_unasked(ray_start_head, tmp_path):
    """RAY_ADDRESS unset and a `ray start` cluster on the machine: ray.init() would join it and
    refuse the job's num_cpus with a traceback. The job names the cluster and the two choices,
    and ray.address=local runs it on a local cluster of its own."""
    address, env = ray_start_head
    done = subprocess.run(_annotate_command(tmp_path), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    error = _one_error_line(done)
    assert f"already running on this machine at {address}" in error, error
    assert "ray.address=auto" in error and f"RAY_ADDRESS={address}" in error and "ray.address=local" in error

    local = _annotate_command(tmp_path, "ray.address=local", "ray.num_cpus=1", "ray.object_store_mb=100",
                              "pool.num_actors=1", "pool.cpus_per_actor=0.5", "pool.batch_size=50")
    done = subprocess.run(local, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _ids(tmp_path / "job" / "annotated.jsonl") == [s.id for s in read_dataset(SAMPLE)]


def test_a_bad_llm_engine_is_one_line_before_any_row_is_dispatched(tmp_path, capsys):
    """An unknown kind, no model, a missing local model, an endpoint that is down: each is
    one line naming the key (exit 2) from the driver; no row is prepared or dispatched."""
    from jobs.cli import ANNOTATE
    from knowfree_core.commandline import main

    base = ["--set", f"input=[{SAMPLE}]", "--set", f"output_dir={tmp_path / 'job'}", "--set", "annotator=llm"]
    cases = {
        "llm.engine.kind: unknown LLM engine 'bogus'; known engines: openai, transformers, vllm":
            ["llm.engine.kind=bogus", "llm.engine.model=m"],
        "llm.engine.model is empty": ["llm.engine.kind=openai"],
        "llm.engine.model: no model folder": ["llm.engine.kind=transformers", f"llm.engine.model={tmp_path / 'none'}"],
        "llm.engine.structured_outputs: the transformers engine cannot constrain answers to a schema":
            ["llm.engine.kind=transformers", f"llm.engine.model={tmp_path / 'none'}", "llm.engine.structured_outputs=true"],
        "engine.price_per_million.input must be >= 0": ["llm.engine.kind=openai", "llm.engine.model=m",
                                                            "llm.engine.price_per_million.input=-1"],
        "cannot reach http://127.0.0.1:9/v1": ["llm.engine.kind=openai", "llm.engine.model=m",
                                              "llm.engine.base_url=http://127.0.0.1:9/v1", "llm.engine.max_retries=0"],
    }
    for expected, overrides in cases.items():
        code = main(ANNOTATE, base + [arg for value in overrides for arg in ("--set", value)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and expected in err and "Traceback" not in err, err
        assert not (tmp_path / "job" / "input").exists(), "rows were prepared before the engine was checked"


def test_the_pool_withholds_engine_failed_rows_into_their_own_file(tmp_path):
    """What keeps a failed row out of Ray Data's checkpoint: it is not in the batch returned."""
    import pyarrow as pa

    from jobs.annotate import output_schema
    from jobs.rowjob import withhold_failed

    def row(i, reason=None):
        rejections = [{"annotator": "llm", "step": "ent", "reason": reason, "detail": "x"}] if reason else []
        return {"id": f"s{i}", "order": i, "record": "{}", "annotator": "llm", "raw_answers": "{}",
                "prompt_versions": "{}", "rejections": json.dumps(rejections), "n_spans": 0,
                "n_rejections": len(rejections), "seconds": 0.0}

    table = pa.Table.from_pylist([row(0), row(1, "engine error"), row(2, "not found")], schema=output_schema())
    kept = withhold_failed(table, tmp_path / "failed")
    assert kept.schema == table.schema and kept.column("id").to_pylist() == ["s0", "s2"]
    (written,) = list((tmp_path / "failed").iterdir())
    assert written.suffix == ".jsonl" and [json.loads(line)["id"] for line in written.read_text().splitlines()] == ["s1"]
    assert withhold_failed(kept, tmp_path / "failed") is kept  # nothing failed: the batch as it was


def _rows_ids(job: Path) -> list[str]:
    return [json.loads(line)["id"] for path in (job / "rows").glob("*.json")
            for line in path.read_text(encoding="utf-8").splitlines()]


def _llm_config(tmp_path: Path, stub, *overrides: str):
    return _config(tmp_path, "annotator=llm", "steps=[ent,seg]", "pool.num_actors=1", "pool.batch_size=4",
                   "llm.engine.kind=openai", "llm.engine.model=stub", f"llm.engine.base_url={stub.base_url}",
                   "llm.engine.max_retries=0", *overrides)


def test_engine_failed_sentences_are_not_done_and_the_same_command_asks_them_again(ray_cluster, llm_stub, tmp_path,
                                                                                   capsys):
    """A third of the P_ent prompts get 500s: the run writes every sentence but records those
    as failed, not done, and exits non-zero (over max_error_rate); the same command then asks
    exactly those prompts again and ends with every id exactly once. Sentences rejected for
    their content (garbage P_seg answers) stay done and are not asked again."""
    small = _first_sentences(tmp_path, 12)
    sentences = read_dataset(small)
    failing = {s.text for s in sentences[:4]}
    healthy = [False]

    def answer(request):
        sentence = request.prompt_text.rsplit("输入：", 1)[-1].strip()
        if "命名实体" in request.prompt_text:
            if sentence in failing and not healthy[0]:
                return StubReply(status=500, text="overloaded")
            return json.dumps([{"entity": sentence[:2], "type": "测试"}, {"entity": sentence[-2:], "type": "其他"}],
                              ensure_ascii=False)
        return "抱歉，我无法回答" if request.prompt_text != "ping" else "pong"

    llm_stub.answer = answer
    config = _llm_config(tmp_path, llm_stub, f"input=[{small}]")
    job = Path(config.output_dir)
    with pytest.raises(KnowFreeError) as error:
        run_annotation(config)
    message = str(error.value)
    assert "\n" not in message
    for part in ("4 of 12 sentences (33.3%) failed through engine errors", "max_error_rate 0.2",
                 "ent: InternalServerError", "overloaded", "asks them again"):
        assert part in message, message
    summary = json.loads((job / "summary.json").read_text(encoding="utf-8"))
    assert summary["engine_failed_rows"] == 4 and summary["sentences"] == 12
    failed_ids = {s.id for s in sentences[:4]}
    listed = [json.loads(line) for line in (job / "failed.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {entry["id"] for entry in listed} == failed_ids
    assert all(e["step"] == "ent" and e["reason"] == "engine error" for entry in listed for e in entry["errors"])
    # every sentence is in the training file; only the others are recorded as done
    assert _ids(job / "annotated.jsonl") == [s.id for s in sentences]
    assert sorted(_rows_ids(job)) == sorted(s.id for s in sentences[4:])

    def asked():
        return sorted(r.prompt_text for r in llm_stub.requests if r.prompt_text != "ping")

    before = len(llm_stub.requests)
    healthy[0] = True
    again = run_annotation(config)
    rerun = sorted(r.prompt_text for r in llm_stub.requests[before:] if r.prompt_text != "ping")
    assert len(rerun) == 4 and all("命名实体" in p and p.rsplit("输入：", 1)[-1].strip() in failing for p in rerun)
    assert again["engine_failed_rows"] == 0 and again["written_this_run"] == 4
    assert (job / "failed.jsonl").read_text(encoding="utf-8") == ""
    ids = _rows_ids(job)
    assert sorted(ids) == sorted(s.id for s in sentences) and len(ids) == len(set(ids))
    assert _ids(job / "annotated.jsonl") == [s.id for s in sentences]
    assert again["spans_by_source"]["llm:ent"] >= 12
    # the garbage segmentations are still counted, once per sentence
    assert sum(n for reason, n in again["rejections_by_reason"].items() if reason.startswith("seg:")) >= 12

    assert again["extension_labels"] == 2 and again["warnings"] == []

    # done: the same command asks nothing; a label map past max_extension_labels is a warning
    # in the summary and the printed table, not a failure
    asked_before = asked()
    capsys.readouterr()
    config.max_extension_labels = 1
    done = run_annotation(config)
    assert done["written_this_run"] == 0 and asked() == asked_before
    (warning,) = done["warnings"]
    assert "2 distinct extension labels, more than max_extension_labels 1" in warning
    assert f"warning: {warning}" in capsys.readouterr().out.splitlines()


def test_an_endpoint_echoing_the_key_leaves_it_in_no_stored_file(ray_cluster, llm_stub, tmp_path):
    """The bearer key echoed into answers (as an entity type too) and into error texts is in
    no byte of rows/, annotated.jsonl, failed.jsonl, summary.json or answers.sqlite."""
    secret = "sk-job-echo-0123456789-SECRET"
    (tmp_path / "key").write_text(secret + "\n", encoding="utf-8")
    small = _first_sentences(tmp_path, 4)
    first = read_dataset(small)[0].text

    def answer(request):
        if request.prompt_text == "ping":
            return "pong"
        sentence = request.prompt_text.rsplit("输入：", 1)[-1].strip()
        if sentence == first:
            return StubReply(status=500, text=f"bad request from {request.authorization}")
        return json.dumps([{"entity": sentence[:2], "type": request.authorization}, "key: " + secret],
                          ensure_ascii=False)

    llm_stub.answer = answer
    summary = run_annotation(_llm_config(tmp_path, llm_stub, f"input=[{small}]", f"llm.engine.api_key_file={tmp_path / 'key'}",
                                         "max_error_rate=0.5"))
    assert set(llm_stub.authorizations) == {f"Bearer {secret}"}
    assert summary["engine_failed_rows"] == 1 and summary["spans_by_source"]["llm:ent"] >= 3
    job = tmp_path / "job"
    labels = {e.label for s in read_dataset(job / "annotated.jsonl") for e in s.extension_spans}
    assert "ENT-Bearer [redacted]" in labels
    assert "[redacted]" in (job / "failed.jsonl").read_text(encoding="utf-8")
    stored = [path for path in job.rglob("*") if path.is_file()]
    assert any(path.name.startswith("answers.sqlite") for path in stored)
    assert [path for path in stored if secret.encode() in path.read_bytes()] == []
