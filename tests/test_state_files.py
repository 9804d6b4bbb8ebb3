"""The project's own files (checkpoints, model folders) are read without unpickling code: a
file that holds anything else is a one-line error naming it (README "Reliability")."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from knowfree_core.errors import KnowFreeError
from knowfree_core.loop_state import EpochReport, LoopState


class _RunsACommand:
    """What a hostile checkpoint holds: unpickling it calls ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _one_line_naming(error: pytest.ExceptionInfo, path: Path) -> str:
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    return message


def test_a_checkpoint_holding_code_is_refused_without_running_it(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "checkpoint" / "last.pt"
    path.parent.mkdir()
    torch.save({"epoch": 1, "history": [], "payload": _RunsACommand(marker)}, path)
    with pytest.raises(KnowFreeError) as error:
        LoopState.load(path)
    message = _one_line_naming(error, path)
    assert "not a knowfree checkpoint (refusing to unpickle arbitrary objects)" in message and "system" in message
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated"])
def test_an_empty_or_broken_checkpoint_is_one_line(tmp_path, content):
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    with pytest.raises(KnowFreeError, match="not a knowfree checkpoint") as error:
        LoopState.load(path)
    _one_line_naming(error, path)


def test_a_checkpoint_of_allowed_types_still_loads(tmp_path):
    # What fit saves: tensors, numbers, strings, lists, dicts and random's state tuple.
    import random

    state = LoopState(epoch=2, history=[EpochReport(1, 0.5, 1.0, 10.0), EpochReport(2, 0.25, 1.0, 10.0)],
                      best_f1=0.5, best_epoch=2, best_state={"w": torch.ones(2)},
                      batch_rng=random.Random(3).getstate(), torch_rng=torch.get_rng_state())
    state.save(tmp_path / "last.pt")
    loaded = LoopState.load(tmp_path / "last.pt")
    assert loaded.epoch == 2 and [r.train_loss for r in loaded.history] == [0.5, 0.25]
    assert torch.equal(loaded.best_state["w"], torch.ones(2)) and torch.equal(loaded.torch_rng, state.torch_rng)


@pytest.fixture()
def saved_model(tmp_path) -> Path:
    from model_fixtures import build_tiny_model, make_random_encoder, tiny_corpus

    model = build_tiny_model(make_random_encoder(tmp_path / "encoder"), tiny_corpus(4, seed=1))
    return model.save_pretrained(tmp_path / "model")


def _load(folder: Path):
    from knowfree_core.model.knowfree import KnowFreeModel

    return KnowFreeModel.from_pretrained(folder)


@pytest.mark.parametrize("name", ["head.safetensors", "encoder/model.safetensors"])
def test_a_pickle_under_a_safetensors_name_is_refused(saved_model, name):
    from safetensors.torch import load_file

    path = saved_model / name
    tensors = {name: tensor.clone() for name, tensor in load_file(path).items()}
    path.unlink()  # a new file, not a rewrite of the memory-mapped one
    torch.save(tensors, path)  # the same tensors, in the pickle format
    with pytest.raises(KnowFreeError, match="not a safetensors file") as error:
        _load(saved_model)
    _one_line_naming(error, path)


@pytest.mark.parametrize("edit, key", [
    (lambda m: m.update(extra=1), "'extra'"),
    (lambda m: m["model"].update(windw=5), "'model.windw'"),
    (lambda m: m["encoder"].update(pooling_x="max"), "'encoder.pooling_x'"),
])
def test_an_unknown_key_in_knowfree_json_is_named(saved_model, edit, key):
    path = saved_model / "knowfree.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    edit(manifest)
    path.write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(KnowFreeError, match=f"unknown key\\(s\\) {key}") as error:
        _load(saved_model)
    _one_line_naming(error, path)


def test_the_cli_reports_a_bad_model_folder_on_one_line(saved_model, capsys):
    from knowfree_core.cli import main

    (saved_model / "knowfree.json").write_text("{not json", encoding="utf-8")
    code = main(["evaluate", "--model", str(saved_model), "--data", str(saved_model / "labels.json"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "knowfree.json: not valid JSON" in err
