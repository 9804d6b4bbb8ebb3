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
