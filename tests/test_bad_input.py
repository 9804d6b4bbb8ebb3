"""The malformed-input corpus in tests/fixtures/bad_input/: every file gets a clear error naming
the file and line, or a documented repair that is counted and reported (README, "Reliability")."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from knowfree_core.errors import DataFormatError, KnowFreeError
from knowfree_core.formats import read_dataset, read_dataset_with_report

BAD = Path(__file__).parent / "fixtures" / "bad_input"


@pytest.mark.parametrize("name, where", [
    ("missing_column.conll", "missing_column.conll:2"),
    ("non_utf8.conll", "non_utf8.conll:2"),
    ("span_out_of_range.jsonl", "span_out_of_range.jsonl:1"),
])
def test_errors_name_the_file_and_line(name, where):
    with pytest.raises(DataFormatError) as caught:
        read_dataset(BAD / name)
    assert where in str(caught.value) and "expected" in str(caught.value)


@pytest.mark.parametrize("name, command, message", [
    ("missing_column.conll", "sample", "missing_column.conll:2: missing column"),
    ("non_utf8.conll", "sample", "non_utf8.conll:2: byte(s)"),
    ("span_out_of_range.jsonl", "sample", "span_out_of_range.jsonl:1:"),
    ("yaml_syntax_error.yaml", "train", "yaml_syntax_error.yaml:3: malformed YAML in config file"),
    ("top_level_list.yaml", "train", "top_level_list.yaml: a config file must be a YAML mapping of keys, found a list"),
    ("alias_bomb.yaml", "train", "alias_bomb.yaml: YAML aliases expand to"),
])
def test_the_command_line_reports_each_bad_file_on_one_line(tmp_path, capsys, name, command, message):
    from knowfree_core.cli import main

    if command == "train":  # a config file
        argv = ["train", "--config", str(BAD / name), "--quiet"]
    else:  # a data file
        argv = ["sample", "--data", str(BAD / name), "--out", str(tmp_path / "out"), "--sizes", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("name, spans, repairs", [
    # I- without B- opens a span; a BIO sentence next to a BIOES one is read as BIOES, the
    # unclosed B- span closed at the sentence end: both counted as repairs
    ("i_without_b.conll", [[(0, 2, "PER"), (3, 5, "LOC")]], 1),
    ("mixed_schemes.conll", [[(0, 2, "PER")], [(0, 1, "PER"), (1, 3, "LOC")]], 1),
    ("crlf.conll", [[(0, 2, "PER")], [(0, 2, "LOC")]], 0),
])
def test_repairs_are_counted_and_reported(name, spans, repairs, caplog):
    with caplog.at_level(logging.WARNING, logger="knowfree_core.formats"):
        sentences, report = read_dataset_with_report(BAD / name)
    assert [[(s.start, s.end, s.label) for s in x.spans] for x in sentences] == spans
    assert report.repairs == repairs
    if repairs:
        assert f"{repairs} broken tag sequence(s) repaired" in caplog.text and name in caplog.text


# The characters in the first column of space_characters.conll, sentence by sentence.
SPACE_UNITS = [["张", "三", "\u3000", "在", "\u00a0", "北", "京"], ["e", "\u0301", "\u200b", "\u3000", "好"]]


def test_unicode_spaces_and_invisible_characters_are_units(tmp_path):
    # Chinese corpora store an ideographic or no-break space as the character of a line; only
    # ASCII blanks separate the columns, so such lines keep their unit and the spans stay put.
    from knowfree_core.formats.conll import read_conll, write_conll

    sentences = read_conll(BAD / "space_characters.conll")
    assert [s.units for s in sentences] == SPACE_UNITS
    assert [[(s.start, s.end, s.label) for s in x.spans] for x in sentences] == [
        [(0, 2, "PER"), (5, 7, "LOC")], [(0, 2, "PER")]]
    write_conll(sentences, tmp_path / "again.conll", separator=" ")
    assert [s.units for s in read_conll(tmp_path / "again.conll")] == SPACE_UNITS


def test_empty_sentences_are_skipped_and_counted(caplog):
    with caplog.at_level(logging.WARNING, logger="knowfree_core.formats"):
        sentences, report = read_dataset_with_report(BAD / "empty_sentence.jsonl")
    assert [s.id for s in sentences] == ["a"] and report.empty_sentences == 1
    assert "1 empty sentence(s) skipped (e.g. " in caplog.text and "empty_sentence.jsonl:2" in caplog.text


def _train_config(tmp_path: Path, train_file: Path) -> Path:
    from model_fixtures import tiny_run_config

    config = tiny_run_config(tmp_path, epochs=1, num_threads=1)
    config["data"]["train"] = str(train_file)
    config["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def test_an_empty_training_file_is_a_clear_error(tmp_path, capsys):
    from knowfree_core.cli import main

    assert main(["train", "--config", str(_train_config(tmp_path, BAD / "empty_file.conll")), "--quiet"]) == 2
    assert "empty_file.conll: no training sentences" in capsys.readouterr().err


def test_a_5000_character_training_sentence_is_left_out_and_counted(tmp_path, caplog):
    from knowfree_core.config import load_config
    from knowfree_core.formats import write_dataset
    from knowfree_core.run import run_training
    from model_fixtures import tiny_corpus

    train_file = tmp_path / "train_with_long.jsonl"
    write_dataset(tiny_corpus(8, seed=1) + read_dataset(BAD / "long_sentence.jsonl"), train_file)
    config = load_config(_train_config(tmp_path, train_file))
    with caplog.at_level(logging.WARNING, logger="knowfree_core.run"):
        summary = run_training(config, progress=False)
    assert "1 training sentence(s) longer than data.max_train_units=1000 left out (e.g. long, 5000 units)" in caplog.text
    assert "long" not in {s.id for s in read_dataset(summary.run_dir / "train_data.jsonl")}


def test_labels_unknown_to_the_model_at_evaluation_are_named(tmp_path, caplog):
    from knowfree_core.cli import main
    from model_fixtures import build_tiny_model, make_random_encoder, tiny_corpus

    model = build_tiny_model(make_random_encoder(tmp_path / "encoder"), tiny_corpus(6, seed=1))
    model.save_pretrained(tmp_path / "model")
    with caplog.at_level(logging.WARNING):
        code = main(["evaluate", "--model", str(tmp_path / "model"), "--data", str(BAD / "unknown_label_dev.conll"),
                     "--quiet"])
    assert code == 0
    assert "labels the model does not know (scored as misses): GPE" in caplog.text


def test_the_corpus_is_complete():
    """Each kind of bad input the README lists has its file here."""
    assert {p.name for p in BAD.iterdir()} >= {
        "missing_column.conll", "non_utf8.conll", "span_out_of_range.jsonl", "i_without_b.conll",
        "mixed_schemes.conll", "crlf.conll", "empty_sentence.jsonl", "empty_file.conll", "long_sentence.jsonl",
        "unknown_label_dev.conll", "space_characters.conll", "yaml_syntax_error.yaml", "top_level_list.yaml",
        "alias_bomb.yaml", "raw_text_folder", "pickle_named.safetensors", "unknown_key_model", "epochs_zero.yaml",
        "plugin_not_annotator.yaml"}
    assert issubclass(DataFormatError, KnowFreeError)


@pytest.mark.parametrize("text, message", [
    ("a: &a [1, *a]\n", "a YAML alias refers to an anchor that contains it"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "YAML nested too deeply"),
    ("a: &x [1, 2]\nb: *x\nc: *x\n", None),  # reuse, as bench/quality.yaml does, is fine
])
def test_recursive_and_deep_yaml_are_one_line_errors(tmp_path, text, message):
    from knowfree_core.yaml_files import read_yaml_mapping

    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    if message is None:
        assert read_yaml_mapping(path) == {"a": [1, 2], "b": [1, 2], "c": [1, 2]}
        return
    with pytest.raises(KnowFreeError, match=message) as error:
        read_yaml_mapping(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


# --- the command line: one line on stderr naming the file or key, exit status 2 -------------------


def _one_line(capsys, *expected: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from model_fixtures import build_tiny_model, make_random_encoder, tiny_corpus

    root = tmp_path_factory.mktemp("model")
    model = build_tiny_model(make_random_encoder(root / "encoder"), tiny_corpus(6, seed=1))
    return model.save_pretrained(root / "model")


FOLDER = BAD / "raw_text_folder"


@pytest.mark.parametrize("argv", [
    ["sample", "--data", str(FOLDER), "--out", "{tmp}/out", "--sizes", "1"],
    ["train", "--set", f"data.train={FOLDER}", "--set", "output_dir={tmp}/run", "--quiet"],
    ["evaluate", "--model", "{model}", "--data", str(FOLDER), "--quiet"],
])
def test_a_folder_given_for_a_data_file_is_one_line(tmp_path, tiny_model, capsys, argv):
    from knowfree_core.cli import main

    argv = [a.format(tmp=tmp_path, model=tiny_model) for a in argv]
    assert main(argv) == 2
    _one_line(capsys, f"{FOLDER}: is a folder, not a file (expected a jsonl, conll or conllu data file)")


def test_knowfree_annotate_reads_a_folder_as_raw_text_like_the_job(tmp_path, capsys):
    """``knowfree annotate --data FOLDER`` used to end in IsADirectoryError; jobs.annotate reads a
    folder as raw .txt files (one sentence per line), and so does the library command now."""
    from knowfree_core.cli import main

    out = tmp_path / "annotated.jsonl"
    assert main(["annotate", "--data", str(FOLDER), "--out", str(out), "--annotator", "jieba", "--steps", "seg"]) == 0
    sentences = read_dataset(out)
    assert [s.id for s in sentences] == ["sentences.txt:1", "sentences.txt:2"]
    assert sentences[0].text == "张三在北京工作。" and sentences[0].extension_spans
    capsys.readouterr()  # the annotator's counts
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["annotate", "--data", str(empty), "--out", str(out), "--annotator", "jieba"]) == 2
    _one_line(capsys, f"input folder {empty} has no .txt files")


@pytest.mark.parametrize("argv, message", [
    (["predict", "--model", "{model}", "--input", str(FOLDER)], f"{FOLDER}: is a folder, but a file is expected"),
    (["predict", "--model", "{model}", "--input", "{tmp}/missing.txt"], "{tmp}/missing.txt: no such file or folder"),
    (["predict", "--model", "{model}", "--input", str(FOLDER / "sentences.txt"), "--output", "{tmp}"],
     "{tmp}: is a folder, but a file is expected"),
    (["sample", "--data", str(BAD / "crlf.conll"), "--out", str(BAD / "crlf.conll"), "--sizes", "1"],
     f"{BAD / 'crlf.conll'}: is a file, but a folder is expected"),
])
def test_a_path_of_the_wrong_kind_is_one_line_in_every_command(tmp_path, tiny_model, capsys, argv, message):
    from knowfree_core.cli import main

    assert main([a.format(tmp=tmp_path, model=tiny_model) for a in argv]) == 2
    _one_line(capsys, message.format(tmp=tmp_path))


def test_a_pickle_under_a_safetensors_name_is_one_line(tmp_path, tiny_model, capsys):
    import shutil

    from knowfree_core.cli import main

    model = shutil.copytree(tiny_model, tmp_path / "model")
    (model / "head.safetensors").unlink()
    shutil.copy(BAD / "pickle_named.safetensors", model / "head.safetensors")
    assert main(["evaluate", "--model", str(model), "--data", str(BAD / "crlf.conll"), "--quiet"]) == 2
    _one_line(capsys, f"{model / 'head.safetensors'}: not a safetensors file")


def test_an_unknown_key_in_knowfree_json_is_one_line(tmp_path, capsys):
    from knowfree_core.cli import main

    assert main(["evaluate", "--model", str(BAD / "unknown_key_model"), "--data", str(BAD / "crlf.conll")]) == 2
    _one_line(capsys, f"{BAD / 'unknown_key_model' / 'knowfree.json'}: unknown key(s) 'model.windw'")


def test_a_range_error_in_a_config_file_is_one_line(capsys):
    from knowfree_core.cli import main

    assert main(["train", "--config", str(BAD / "epochs_zero.yaml"), "--quiet"]) == 2
    _one_line(capsys, str(BAD / "epochs_zero.yaml"), "train.epochs must be at least 1, got 0")


def test_a_plugin_that_is_no_annotator_in_a_config_file_is_one_line(tmp_path, capsys, monkeypatch):
    from jobs.cli import ANNOTATE
    from knowfree_core import commandline

    monkeypatch.chdir(tmp_path)  # the command it names would create SHOULD_NOT_EXIST here
    argv = ["--config", str(BAD / "plugin_not_annotator.yaml"), "--set", f"input=[{BAD / 'crlf.conll'}]",
            "--set", f"output_dir={tmp_path / 'out'}"]
    assert commandline.main(ANNOTATE, argv, prog="python -m jobs.annotate") == 2
    _one_line(capsys, "annotator: 'os:system' is not a subclass")
    assert not (tmp_path / "SHOULD_NOT_EXIST").exists()
