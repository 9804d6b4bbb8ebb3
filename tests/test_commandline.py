"""One command-line layer: ``knowfree <command>`` and ``python -m jobs.<name>`` are built by the
same parser builder, with the same --config/--set/--verbose and the same error path (one line
on stderr, exit status 2); output is quiet unless --verbose or KNOWFREE_VERBOSE=1."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import cli as jobs_cli
from knowfree_core import cli as core_cli
from knowfree_core import commandline
from knowfree_core.errors import ConfigError, KnowFreeError
from knowfree_core.output import PROJECT_LOGGERS, QUIET_ENVIRONMENT, OutputSettings, configure_output

ROOT = Path(__file__).resolve().parents[1]


def _parse(commands, argv):
    return commandline.parse(commandline.build_parser(commands, prog="test"), argv)


@pytest.mark.parametrize("commands, prefix", [
    (jobs_cli.KNOWFREE_COMMANDS, ["train"]),
    (jobs_cli.KNOWFREE_COMMANDS, ["pipeline"]),
    (jobs_cli.PIPELINE, []),
    (jobs_cli.TRAIN, []),
    (jobs_cli.ANNOTATE, []),
])
def test_every_command_line_has_the_same_config_and_set(commands, prefix):
    args = _parse(commands, [*prefix, "--config", "c.yaml", "--set", "a=1", "--set", "b.c=[1,2]", "-v"])
    assert (args.config, args.overrides, args.verbose) == ("c.yaml", ["a=1", "b.c=[1,2]"], True)


def test_the_library_commands_need_no_ray_and_knowfree_adds_the_pipeline():
    assert "pipeline" not in {c.name for c in core_cli.COMMANDS}
    assert {c.name for c in jobs_cli.KNOWFREE_COMMANDS} == {c.name for c in core_cli.COMMANDS} | {"pipeline"}


def test_shorthand_flags_are_overrides_applied_after_set():
    argv = ["--workers", "2", "--set", "ray_train.num_workers=3", "--gpu", "--cpus-per-worker", "0.5"]
    args = _parse(jobs_cli.TRAIN, argv)
    assert args.overrides == ["ray_train.num_workers=3", "ray_train.num_workers=2", "ray_train.use_gpu=true",
                              "ray_train.resources_per_worker.CPU=0.5"]
    assert _parse(jobs_cli.TRAIN, argv).overrides == args.overrides  # no state kept between parses
    assert _parse(jobs_cli.TRAIN, []).overrides == []


def test_verbose_goes_before_or_after_the_sub_command():
    assert _parse(core_cli.COMMANDS, ["-v", "encoder"]).verbose
    assert _parse(core_cli.COMMANDS, ["encoder", "--verbose"]).verbose
    assert not _parse(core_cli.COMMANDS, ["encoder"]).verbose


def test_a_user_error_is_one_line_with_status_2(capsys):
    def fail():
        raise ConfigError("invalid configuration in x.yaml: Key 'bogus' not in 'C'\n    full_key: bogus\n")

    assert commandline.exit_status("knowfree train", fail) == 2
    assert capsys.readouterr().err == "knowfree train: error: invalid configuration in x.yaml: Key 'bogus' not in " \
                                      "'C'; full_key: bogus\n"


def test_knowfree_pipeline_reports_a_missing_config_in_one_line(tmp_path, capsys):
    assert jobs_cli.main(["pipeline", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("knowfree pipeline: error: ") and "missing.yaml" in err and err.count("\n") == 1


def test_python_m_job_uses_the_same_error_path(tmp_path):
    process = subprocess.run([sys.executable, "-m", "jobs.merge_labels", "--config", str(tmp_path / "missing.yaml")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert process.returncode == 2, process.stderr
    assert process.stderr.startswith("python -m jobs.merge_labels: error: ") and process.stderr.count("\n") == 1


def test_a_job_without_ray_says_what_to_install(monkeypatch):
    from jobs.common import RayConfig, init_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(KnowFreeError, match=r"needs Ray: pip install 'knowfree\[ray\]'"):
        init_ray(RayConfig())


def test_verbose_comes_from_the_flag_or_the_environment():
    assert OutputSettings.resolve(False, {}).verbose is False
    assert OutputSettings.resolve(True, {}).verbose is True
    assert OutputSettings.resolve(False, {"KNOWFREE_VERBOSE": "1"}).verbose is True
    assert OutputSettings.resolve(False, {"KNOWFREE_VERBOSE": "0"}).verbose is False


@pytest.fixture
def restored_output(monkeypatch):
    """configure_output changes process-wide switches: put them back after the test."""
    for name in (*QUIET_ENVIRONMENT, "KNOWFREE_VERBOSE"):
        monkeypatch.delenv(name, raising=False)
    levels = {name: logging.getLogger(name).level for name in PROJECT_LOGGERS}
    transformers_logging = pytest.importorskip("transformers.utils.logging")
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    yield transformers_logging
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    transformers_logging.set_verbosity(verbosity)
    (transformers_logging.enable_progress_bar if bars else transformers_logging.disable_progress_bar)()


def test_quiet_output_silences_transformers_here_and_in_workers(restored_output):
    configure_output(OutputSettings(verbose=False))
    assert {name: os.environ.get(name) for name in QUIET_ENVIRONMENT} == QUIET_ENVIRONMENT
    assert restored_output.get_verbosity() == logging.ERROR and not restored_output.is_progress_bar_enabled()
    assert logging.getLogger("knowfree_core").level == logging.INFO  # the stage lines stay


def test_verbose_output_reaches_the_workers(restored_output):
    configure_output(OutputSettings(verbose=True))
    assert os.environ.get("KNOWFREE_VERBOSE") == "1" and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    assert logging.getLogger("jobs").level == logging.DEBUG


def test_ray_data_progress_is_off_by_default(ray_cluster, monkeypatch):
    from ray.data import DataContext

    from jobs.common import RayConfig, init_ray

    monkeypatch.delenv("KNOWFREE_VERBOSE", raising=False)
    monkeypatch.setattr(DataContext.get_current(), "enable_progress_bars", True)
    init_ray(RayConfig())
    assert DataContext.get_current().enable_progress_bars is False
    assert logging.getLogger("ray.data").getEffectiveLevel() == logging.WARNING


@pytest.mark.parametrize("script", ["quality.py", "quality_gpu.py", "model_throughput.py",
                                    "predict_throughput.py"])
def test_bench_scripts_run_from_the_repository_root(script):
    # As the README runs them: the installed package and the sibling scripts suffice.
    process = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert process.returncode == 0, process.stderr
    assert process.stdout.startswith("usage: ")


@pytest.mark.parametrize("autoscaler_max, wait, outcome", [
    (8.0, False, "warning"),  # an autoscaler Ray reports can grow the cluster to the need
    (2.0, False, "its autoscaler can grow it to 2 at most"),
    (None, False, "Ray reports no autoscaler that could add any"),
    (None, True, "warning"),  # ray.wait_for_resources: an autoscaler Ray does not report
])
def test_a_connected_cluster_short_of_cpus_fails_unless_it_can_grow(caplog, autoscaler_max, wait, outcome):
    from jobs.common import check_cluster_size

    def check():
        check_cluster_size(1.0, 3.25, autoscaler_max, wait, "10.0.0.1:6379", "pool.num_actors")

    if outcome == "warning":
        with caplog.at_level(logging.WARNING, logger="jobs.common"):
            check()
        assert "has 1 CPUs but this job's pipeline needs 3.25 at once" in caplog.text
        return
    with pytest.raises(KnowFreeError) as error:
        check()
    message = str(error.value)
    assert "\n" not in message and outcome in message and "10.0.0.1:6379 has 1 CPUs" in message
    assert "lower pool.num_actors" in message and "ray.wait_for_resources=true" in message


def test_a_cluster_that_refuses_the_connection_is_one_line(monkeypatch):
    """ray.init's ConnectionError (here: a token-protected `ray start` cluster, a traceback of 20
    retries) is one line that says what to set."""
    ray = pytest.importorskip("ray")
    from jobs.common import RayConfig, init_ray

    def refuse(**kwargs):
        try:
            raise RuntimeError("Failed to connect to GCS. Last connection error: Traceback ...\n"
                               "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: ...")
        except RuntimeError as cause:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from cause

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(KnowFreeError) as error:
        init_ray(RayConfig(address="10.0.0.1:6379"))
    message = str(error.value)
    assert "\n" not in message and "cannot connect to Ray (ray.address=10.0.0.1:6379)" in message
    assert "set RAY_AUTH_MODE=token" in message
