"""A dev set held out of the training file (``data.dev_from_train``) for corpora that ship none:
the same dev sentences for every subset and seed, never among the training sentences, in
``knowfree train`` (prepare_data) and in the pipeline's cells."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowfree_core.config import load_config
from knowfree_core.errors import ConfigError
from knowfree_core.formats import read_dataset, write_dataset
from knowfree_core.run import load_pool_and_dev, prepare_data, select_training_sentences
from knowfree_core.sampling import hold_out
from model_fixtures import tiny_corpus


def test_hold_out_is_seeded_disjoint_and_keeps_the_pool_order():
    pool = tiny_corpus(30, seed=1)
    rest, dev = hold_out(pool, 8, seed=0)
    assert len(dev) == 8 and len(rest) == 22
    assert {s.id for s in rest}.isdisjoint({s.id for s in dev})
    assert [s.id for s in rest + dev if s.id in {x.id for x in rest}] == [s.id for s in pool if s in rest]
    assert [s.id for s in hold_out(pool, 8, seed=0)[1]] == [s.id for s in dev]  # the same draw again
    assert [s.id for s in hold_out(pool, 8, seed=1)[1]] != [s.id for s in dev]
    with pytest.raises(ValueError, match="nothing would be left"):
        hold_out(pool, 30, seed=0)


def _config(tmp_path: Path, *overrides: str):
    write_dataset(tiny_corpus(30, seed=1), tmp_path / "train.jsonl")
    return load_config(None, [f"data.train={tmp_path / 'train.jsonl'}", f"output_dir={tmp_path / 'run'}",
                              "data.dev_from_train=8", *overrides])


def test_every_subset_seed_trains_beside_the_same_held_out_dev(tmp_path):
    dev_ids = None
    for seed in (1, 2, 3):
        config = _config(tmp_path, "data.subset_size=12", f"data.subset_seed={seed}")
        pool, dev = load_pool_and_dev(config)
        train = select_training_sentences(config, pool)
        assert dev_ids in (None, [s.id for s in dev])
        dev_ids = [s.id for s in dev]
        assert len(train) == 12 and not {s.id for s in train} & set(dev_ids)
    (tmp_path / "run").mkdir()
    prepared = prepare_data(_config(tmp_path, "data.subset_size=12"), tmp_path / "run")
    assert [s.id for s in prepared.dev] == dev_ids


def test_a_dev_file_and_a_held_out_dev_are_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="exclusive"):
        _config(tmp_path, f"data.dev={tmp_path / 'train.jsonl'}")
    with pytest.raises(ConfigError, match="dev_from_train"):
        load_pool_and_dev(_config(tmp_path, "data.dev_from_train=30"))


def test_a_pipeline_cell_writes_the_held_out_dev_and_trains_without_it(tmp_path):
    from jobs.pipeline import Cell, PipelineConfig
    from knowfree_core.config import load_structured

    config = _config(tmp_path, "data.subset_size=12", f"data.test={tmp_path / 'train.jsonl'}")
    pipeline = load_structured(PipelineConfig, None, ["train_config=x.yaml", f"output_dir={tmp_path}"])
    trained = {}
    cell = Cell(pipeline, config, tmp_path / "cell", trainer=lambda variant, final: trained.setdefault(variant, final))
    cell.root.mkdir()
    cell.train("noext", cell.subset())
    final = trained["noext"]
    assert final.data.dev_from_train is None and final.data.dev == str(tmp_path / "cell" / "dev.jsonl")
    dev = read_dataset(final.data.dev)
    assert [s.id for s in dev] == [s.id for s in load_pool_and_dev(config)[1]]
    assert not {s.id for s in read_dataset(final.data.train)} & {s.id for s in dev}
    assert final.data.test == str(tmp_path / "cell" / "test.jsonl")
