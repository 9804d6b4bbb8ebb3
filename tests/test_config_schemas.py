"""Every config section is typed when the config is loaded: a typo or a value outside a field's
choices in a pipeline's annotate/merge sections (a file or ``--set``), in a custom variant's
annotate keys or in a bench dataset fails with one line naming the file and the key, before
Ray starts or anything is written."""

from __future__ import annotations

import re
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

import jobs.pipeline as pipeline
from jobs.cli import PIPELINE
from knowfree_core import commandline
from jobs.merge_labels import MergeJobConfig
from knowfree_core.config import KnowFreeConfig, load_config, load_structured, save_config
from knowfree_core.errors import ConfigError
from knowfree_core.llm.engine import EngineConfig

ROOT = Path(__file__).resolve().parents[1]


def _pipeline_file(tmp_path, **sections):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"train_config": "x.yaml", "output_dir": str(tmp_path / "out"), **sections}),
                    encoding="utf-8")
    return path


def _run_pipeline_main(monkeypatch, capsys, argv):
    """jobs.pipeline's main as the command line runs it: (exit status, stderr lines, Ray started)."""
    started = []
    monkeypatch.setattr(pipeline, "init_ray", lambda *args, **kwargs: started.append(True))
    status = commandline.main(PIPELINE, argv, prog="python -m jobs.pipeline")
    return status, capsys.readouterr().err.strip().splitlines(), bool(started)


@pytest.mark.parametrize("section, typo", [("annotate", "annotatr"), ("merge", "proposr")])
def test_a_typo_in_a_pipeline_file_fails_on_loading_with_one_line(tmp_path, monkeypatch, capsys, section, typo):
    path = _pipeline_file(tmp_path, **{section: {typo: "lac"}})
    with pytest.raises(ConfigError, match=rf"{path}.*{section}\.{typo}"):
        load_structured(pipeline.PipelineConfig, path)
    status, err, ray_started = _run_pipeline_main(monkeypatch, capsys, ["--config", str(path)])
    assert status == 2 and not ray_started and not (tmp_path / "out").exists()
    assert len(err) == 1 and str(path) in err[0] and f"{section}.{typo}" in err[0]


@pytest.mark.parametrize("override", ["annotate.annotatr=1", "merge.proposr=1", "annotate.pool.num_actorz=1"])
def test_a_typo_given_with_set_fails_on_loading_with_one_line(tmp_path, monkeypatch, capsys, override):
    path = _pipeline_file(tmp_path)
    status, err, ray_started = _run_pipeline_main(monkeypatch, capsys, ["--config", str(path), "--set", override])
    assert status == 2 and not ray_started and not (tmp_path / "out").exists()
    assert len(err) == 1 and str(path) in err[0] and override.split("=")[0] in err[0]


@pytest.mark.parametrize("override, key", [
    ("merge.proposer=llmx", "merge.proposer"),
    ("merge.faiss_method=kmean", "merge.faiss_method"),
    ("annotate.steps=[ent,pso]", "annotate.steps[1]"),
    ("annotate.output_format=csv", "annotate.output_format"),
    ("annotate.llm.entity_mode=every", "annotate.llm.entity_mode"),
])
def test_a_value_outside_a_fields_choices_fails_on_loading(tmp_path, override, key):
    with pytest.raises(ConfigError, match=re.escape(key) + ": Invalid value") as error:
        load_structured(pipeline.PipelineConfig, _pipeline_file(tmp_path), [override])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("override", ["model.decode=nestd", "model.alpha_scheme=eq16", "model.alpha_schedule=cosine",
                                      "model.grid_mixer=rnn", "encoder.pooling=sum", "encoder.unit_mode=byte",
                                      "train.precision=fp8", "data.annotation_steps=[ent,ner]"])
def test_train_config_choices_are_checked_on_loading(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key) as error:
        load_config(None, ["data.train=x.jsonl", override])
    assert "\n" not in str(error.value)


def test_a_choice_changed_in_code_is_still_checked():
    from knowfree_core.config import validate_config

    config = load_config(None, ["data.train=x.jsonl"])
    config.model.decode = "nestd"
    with pytest.raises(ConfigError, match="model.decode"):
        validate_config(config)


def test_job_and_tune_choices_are_checked_on_loading(tmp_path):
    from jobs.annotate import load_job_config
    from jobs.tune import load_tune_config

    with pytest.raises(ConfigError, match="steps"):
        load_job_config(None, ["input=[x]", f"output_dir={tmp_path}", "steps=[ent,ner]"])
    with pytest.raises(ConfigError, match="proposer"):
        load_structured(MergeJobConfig, None, ["input=x", f"output_dir={tmp_path}", "proposer=gpt"])
    tune = ["train_config=x.yaml", f"output_dir={tmp_path}", "search_space={model.window: {type: choice, values: [1]}}"]
    for override in ("scheduler.name=hyperband", "scheduler.mode=best", "search_alg=hyperopt", "trial_runner=thread"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_tune_config(None, tune + [override])
    with pytest.raises(ConfigError, match="search_space.model.window.type"):
        load_tune_config(None, tune[:2] + ["search_space={model.window: {type: normal, values: [1]}}"])


def test_a_custom_variants_annotate_keys_are_checked_on_loading(tmp_path):
    path = _pipeline_file(tmp_path, custom_variants={"F-jieba": {"annotate": {"annotatorz": "jieba"}}})
    with pytest.raises(ConfigError, match=rf"{path}.*annotatorz") as error:
        load_structured(pipeline.PipelineConfig, path)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="pool.num_actors"):
        load_structured(pipeline.PipelineConfig, _pipeline_file(tmp_path), [
            "custom_variants={F-jieba: {annotate: {pool: {num_actors: many}}}}"])


def test_a_bench_dataset_is_the_pipelines_cell_and_grid_schema(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import quality

    names = {f.name for f in fields(quality.DatasetEntry)}
    assert {f.name for f in fields(pipeline.CellSettings)} <= names
    assert {f.name for f in fields(pipeline.GridConfig)} <= names
    path = tmp_path / "quality.yaml"
    path.write_text(yaml.safe_dump({"datasets": {"tiny": {
        "train_config": "x.yaml", "subset_sizes": [10], "variants": ["F"], "merge": {"proposr": "faiss"}}}}),
        encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{path}.*datasets.tiny.merge.proposr"):
        quality.load_structured(quality.QualityConfig, path)


def test_the_embedding_pool_is_an_actor_pool_without_the_row_job_keys(tmp_path):
    from jobs.rowjob import ActorPool, PoolConfig

    merge = load_structured(MergeJobConfig, None, ["input=x", f"output_dir={tmp_path}"])
    assert type(merge.pool) is ActorPool and (merge.pool.num_actors, merge.pool.batch_size) == (1, 256)
    assert issubclass(PoolConfig, ActorPool)
    with pytest.raises(ConfigError, match="pool.read_cpus"):
        load_structured(MergeJobConfig, None, ["input=x", f"output_dir={tmp_path}", "pool.read_cpus=1"])


def test_speed_only_engine_settings_are_left_out_of_the_answer_settings():
    fast = EngineConfig(model="m", max_concurrency=64, max_retries=1, timeout_s=5.0, base_url="http://x",
                        api_key_env="OTHER", api_key_file="/k")
    assert fast.answer_settings() == EngineConfig(model="m").answer_settings()
    assert EngineConfig(model="m", dtype="bf16").answer_settings() != EngineConfig(model="m").answer_settings()
    assert {"kind", "model", "extra"} <= set(EngineConfig().answer_settings())


def test_fault_injection_is_no_config_key_and_old_run_folders_still_load(tmp_path):
    with pytest.raises(ConfigError, match="ray_train.fail_after_epoch"):
        load_config(None, ["data.train=x.jsonl", "ray_train.fail_after_epoch=2"])
    # Run folders written before the switch moved hold it (null) in their config.yaml.
    config = KnowFreeConfig()
    config.data.train = "x.jsonl"
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text(encoding="utf-8"))
    saved["ray_train"]["fail_after_epoch"] = None
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    assert load_config(tmp_path / "old.yaml") == config
    saved["ray_train"]["fail_after_epoch"] = 2  # set, it would be silently ignored: refused
    (tmp_path / "set.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    with pytest.raises(ConfigError, match="fail_after_epoch"):
        load_config(tmp_path / "set.yaml")


def test_fault_injection_reads_only_its_environment_variable(monkeypatch):
    from jobs.fault_injection import FAIL_AFTER_EPOCH, fail_after_epoch
    from jobs.tune import TuneJobConfig

    assert "fail_after_epoch" not in {f.name for f in fields(TuneJobConfig)}
    monkeypatch.delenv(FAIL_AFTER_EPOCH, raising=False)
    assert fail_after_epoch() is None
    monkeypatch.setenv(FAIL_AFTER_EPOCH, "2")
    assert fail_after_epoch() == 2


def test_the_repositorys_configs_still_load():
    sys.path.insert(0, str(ROOT / "bench"))
    import quality

    for path in sorted((ROOT / "configs").glob("pipeline-*.yaml")) + [ROOT / "configs" / "demo-pipeline.yaml",
                                                                       ROOT / "cluster" / "pipeline-weibo-250.yaml"]:
        load_structured(pipeline.PipelineConfig, path)
    quality.plan_cells(quality.load_structured(quality.QualityConfig, ROOT / "bench" / "quality.yaml"), {})


# --- numeric ranges: a count of 0, a negative size, a probability above 1 -------------------------


@pytest.mark.parametrize("override, key", [
    ("train.epochs=0", "train.epochs must be at least 1, got 0"),
    ("train.batch_size=-2", "train.batch_size must be at least 1"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio must be in [0, 1]"),
    ("train.threshold_candidates=[0.3,1.2]", "train.threshold_candidates must be in (0, 1)"),
    ("train.encoder_lr=-1e-5", "train.encoder_lr must be >= 0"),
    ("model.window=-3", "model.window must be >= 0, got -3"),
    ("model.dropout=1.5", "model.dropout must be in [0, 1]"),
    ("model.output_prior=0", "model.output_prior must be in (0, 1)"),
    ("model.grid_size=0", "model.grid_size must be at least 1"),
    ("data.k_shot=0", "data.k_shot must be at least 1"),
    ("data.max_train_units=-1", "data.max_train_units must be at least 1"),
    ("encoder.stride=0", "encoder.stride must be at least 1"),
    ("ray_train.max_failures=-2", "ray_train.max_failures must be >= -1"),
])
def test_train_config_ranges_are_checked_on_loading(tmp_path, capsys, override, key):
    from knowfree_core.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "x.conll"}}), encoding="utf-8")
    assert main(["train", "--config", str(path), "--set", override, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and str(path) in err and "Traceback" not in err


@pytest.mark.parametrize("job, overrides, key", [
    ("annotate", ["pool.num_actors=0"], "pool.num_actors must be at least 1, got 0"),
    ("annotate", ["pool.batch_size=-1"], "pool.batch_size must be at least 1, got -1"),
    ("annotate", ["max_units=0"], "max_units must be at least 1"),
    ("annotate", ["llm.generation.top_p=0"], "generation.top_p must be in (0, 1]"),
    ("synthesize", ["synthesis.max_units=-5"], "synthesis.max_units must be at least 1, got -5"),
    ("synthesize", ["engine.max_concurrency=0"], "engine.max_concurrency must be at least 1"),
    ("synthesize", ["label.pool.blocks=0"], "pool.blocks must be at least 1"),
    ("merge_labels", ["pool.num_actors=0"], "pool.num_actors must be at least 1"),
    ("merge_labels", ["p=0"], "p must be at least 1"),
])
def test_job_ranges_are_checked_on_loading(tmp_path, capsys, job, overrides, key):
    import jobs.cli

    command = getattr(jobs.cli, job.upper())
    base = {"annotate": ["input=[x]"], "synthesize": ["input=[x]"], "merge_labels": ["input=x"]}[job]
    argv = [item for o in base + [f"output_dir={tmp_path / 'out'}"] + overrides for item in ("--set", o)]
    assert commandline.main(command, argv, prog=job) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and "Traceback" not in err


def test_pipeline_grid_ranges_are_checked_on_loading(tmp_path, monkeypatch, capsys):
    status, err, started = _run_pipeline_main(
        monkeypatch, capsys, ["--config", str(_pipeline_file(tmp_path, grid={"k_shot": [5, 0]}))])
    assert status == 2 and len(err) == 1 and "grid.k_shot must be at least 1" in err[0] and not started


@pytest.mark.parametrize("argv, key", [
    (["--sizes", "-5"], "sizes must be at least 1, got [-5]"),
    (["--k-shot", "0"], "k_shot must be at least 1, got [0]"),
    (["--sizes", "100000"], "subset size 100000 exceeds the 2 sentences available"),
])
def test_sample_sizes_are_checked(tmp_path, capsys, argv, key):
    from knowfree_core.cli import main

    data = ROOT / "tests" / "fixtures" / "bad_input" / "crlf.conll"
    assert main(["sample", "--data", str(data), "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and not (tmp_path / "out").exists()
