"""Config values cannot make a job write (or read templates) outside its run folder, and no
weights are loaded from pickle files (README, "Reliability": security)."""

from __future__ import annotations

import os

import pytest

from knowfree_core.config import KnowFreeConfig
from knowfree_core.errors import ConfigError
from knowfree_core.prompts import load_prompt
from knowfree_core.safe_paths import child_path, inside, plain_name

ESCAPES = ["../x", "../../etc", "/tmp/x", "a/b", "a\\b", ".", "..", ".hidden", "", "a b", "x" * 129]


@pytest.mark.parametrize("name", ["weibo", "n250-seed1", "ud_pos", "微博", "run=3", "k5+syn", "_scratch"])
def test_plain_names_are_accepted(name):
    assert plain_name(name, "key") == name


@pytest.mark.parametrize("name", ESCAPES)
def test_names_that_could_leave_the_folder_are_refused_naming_the_key(name):
    with pytest.raises(ConfigError, match="datasets.x"):
        plain_name(name, "datasets.x")


def test_inside_refuses_a_link_that_points_out_of_the_run_folder(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, run / "link")
    assert inside(run, "model/head.safetensors", "k") == (run / "model" / "head.safetensors").resolve()
    assert child_path(run, "n250-seed1", "k") == (run / "n250-seed1").resolve()
    with pytest.raises(ConfigError, match="outside the run folder"):
        inside(run, "link/file", "k")
    with pytest.raises(ConfigError, match="outside the run folder"):
        inside(run, tmp_path / "other", "k")


def test_quality_harness_refuses_a_dataset_name_that_leaves_runs_dir(tmp_path):
    from tests.test_bench_quality import quality  # bench/ is not a package: loaded there

    config = quality.QualityConfig(
        runs_dir=str(tmp_path / "runs"),
        datasets={"../../outside": quality.DatasetEntry(train_config="x.yaml", subset_sizes=[10], seeds=[1],
                                                         variants=["F"])},
    )
    with pytest.raises(ConfigError, match=r"datasets\.\.\./\.\./outside"):
        quality.plan_cells(config, {})
    assert not (tmp_path / "outside").exists()


def test_ray_train_run_name_is_one_folder_under_the_storage(tmp_path):
    from jobs.train import storage_location

    config = KnowFreeConfig(output_dir=str(tmp_path / "run"))
    assert storage_location(config) == (str((tmp_path / "run" / "ray_train").resolve()), "run")
    config.ray_train.name = "../../elsewhere"
    with pytest.raises(ConfigError, match="ray_train.name"):
        storage_location(config)


@pytest.mark.parametrize("step,language", [("../../../etc/x", "zh"), ("ent", "../en"), ("ent", "/tmp")])
def test_prompt_step_and_language_cannot_reach_files_outside_the_prompt_folders(step, language):
    with pytest.raises(ConfigError, match="not a plain name"):
        load_prompt(step, language)


def test_encoder_weights_in_a_pickle_file_are_refused(tmp_path):
    import torch
    from safetensors.torch import load_file

    from knowfree_core.encoders.unit_encoder import UnitEncoder
    from tests.model_fixtures import make_random_encoder

    folder = make_random_encoder(tmp_path / "enc")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")  # the pickle format
    (folder / "model.safetensors").unlink()
    assert list(folder.glob("*.bin")), "the fixture should now hold only a pickle checkpoint"
    with pytest.raises(ConfigError, match="must be safetensors.*pytorch_model.bin"):
        UnitEncoder(str(folder))
    with pytest.raises(ConfigError, match="must be safetensors"):
        UnitEncoder.from_pretrained(folder)
