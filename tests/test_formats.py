"""Readers, writers and tag schemes of knowfree_core.formats."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knowfree_core.errors import ConfigError, DataFormatError
from knowfree_core.formats import (
    convert_tags,
    detect_format,
    detect_scheme,
    read_conll,
    read_dataset,
    read_dataset_with_report,
    spans_to_tags,
    tags_to_spans,
    write_dataset,
)
from knowfree_core.formats.tagging import ReadReport
from knowfree_core.records import ExtensionSpan, Sentence, Span

FIXTURES = Path(__file__).parent / "fixtures"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIBO_DEV = DATA / "weibo" / "dev.conll"
UD_DEV = DATA / "ud_zh_gsdsimp" / "dev.conllu"


# -- tag schemes ----------------------------------------------------------------------

SPANS = [Span(0, 2, "PER"), Span(2, 3, "LOC"), Span(4, 7, "ORG")]
TAGS = {
    "BIO": ["B-PER", "I-PER", "B-LOC", "O", "B-ORG", "I-ORG", "I-ORG", "O"],
    "BIOES": ["B-PER", "E-PER", "S-LOC", "O", "B-ORG", "I-ORG", "E-ORG", "O"],
    "BMES": ["B-PER", "E-PER", "S-LOC", "O", "B-ORG", "M-ORG", "E-ORG", "O"],
}


@pytest.mark.parametrize("scheme", ["BIO", "BIOES", "BMES"])
def test_spans_to_tags_and_back(scheme):
    tags = spans_to_tags(SPANS, 8, scheme)
    assert tags == TAGS[scheme]
    assert tags_to_spans(tags, scheme) == SPANS
    assert tags_to_spans(tags) == SPANS  # scheme detected from the tags
    assert detect_scheme(tags) == scheme


@st.composite
def _tiled_spans(draw):
    # Random non-overlapping spans (gaps allowed), as any flat NER annotation.
    length = draw(st.integers(0, 30))
    spans, position = [], 0
    while position < length:
        size = draw(st.integers(1, length - position))
        if draw(st.booleans()):
            spans.append(Span(position, position + size, draw(st.sampled_from(["PER", "LOC", "ORG.NAM"]))))
        position += size
    return length, spans


@settings(max_examples=60, deadline=None)
@given(_tiled_spans(), st.sampled_from(["BIO", "BIOES", "BMES"]))
def test_any_flat_spans_round_trip_through_tags(case, scheme):
    length, spans = case
    report = ReadReport()
    assert tags_to_spans(spans_to_tags(spans, length, scheme), scheme, strict=True, report=report) == spans
    assert report.repairs == 0


def test_iobes_alias_and_conversion():
    assert tags_to_spans(TAGS["BIOES"], "IOBES") == SPANS
    assert convert_tags(TAGS["BIO"], "BMES") == TAGS["BMES"]
    assert convert_tags(TAGS["BMES"], "BIO") == TAGS["BIO"]


def test_adjacent_same_type_spans_stay_apart():
    spans = [Span(0, 1, "PER"), Span(1, 3, "PER")]
    for scheme in ("BIO", "BIOES", "BMES"):
        assert tags_to_spans(spans_to_tags(spans, 3, scheme), scheme) == spans


def test_untyped_bmes_segmentation_tags():
    assert tags_to_spans(["B", "E", "S", "B", "M", "E"]) == [Span(0, 2, "W"), Span(2, 3, "W"), Span(3, 6, "W")]


def test_overlapping_spans_cannot_be_tagged():
    with pytest.raises(ValueError, match="overlaps"):
        spans_to_tags([Span(0, 2, "A"), Span(1, 3, "B")], 3)


@pytest.mark.parametrize(
    "tags, scheme, expected",
    [
        (["O", "I-PER", "I-PER"], "BIO", [Span(1, 3, "PER")]),  # orphan I- starts a span
        (["B-PER", "I-LOC"], "BIO", [Span(0, 1, "PER"), Span(1, 2, "LOC")]),  # type change
        (["O", "E-PER"], "BIOES", [Span(1, 2, "PER")]),  # E without B
        (["B-PER", "I-PER", "O"], "BIOES", [Span(0, 2, "PER")]),  # never closed by E-
        (["M-ORG", "E-ORG"], "BMES", [Span(0, 2, "ORG")]),  # orphan M-
    ],
)
def test_lenient_repairs_are_counted(tags, scheme, expected):
    report = ReadReport()
    assert tags_to_spans(tags, scheme, report=report) == expected
    assert report.repairs == 1
    with pytest.raises(DataFormatError):
        tags_to_spans(tags, scheme, strict=True)


def test_invalid_tag_is_a_format_error():
    with pytest.raises(DataFormatError, match="f.conll:7"):
        tags_to_spans(["O", "X-PER"], path="f.conll", lines=[6, 7])
    with pytest.raises(DataFormatError, match="not valid in the BIO scheme"):
        tags_to_spans(["S-PER"], "BIO")


# -- CoNLL ------------------------------------------------------------------------------


def test_char_conll_tab_and_space_separated():
    sentences = read_dataset(FIXTURES / "char_tiny.conll")
    assert [s.id for s in sentences] == ["char_tiny-0", "char_tiny-1"]
    assert sentences[0].text == "张三在北京" and sentences[0].joiner == ""
    assert sentences[0].spans == [Span(0, 2, "PER"), Span(3, 5, "LOC")]
    assert sentences[1].text == "他去上海" and sentences[1].spans == [Span(2, 4, "LOC")]


def test_token_conll_last_column_and_docstart():
    sentences, report = read_dataset_with_report(FIXTURES / "token_tiny.conll")
    assert report.level == "token" and report.skipped_lines == 1
    assert len(sentences) == 2
    assert sentences[0].units == ["EU", "rejects", "German", "call", "."]
    assert sentences[0].joiner == " "
    assert sentences[0].spans == [Span(0, 1, "ORG"), Span(2, 3, "MISC")]
    assert sentences[1].spans == [Span(0, 2, "PER")]


def test_weibo_position_digits_are_stripped():
    sentences, report = read_dataset_with_report(FIXTURES / "weibo_tiny.conll")
    assert report.position_digits_stripped and report.position_digit_anomalies == 0
    assert sentences[0].text == "科技李开复说"
    assert sentences[0].spans == [Span(2, 5, "PER.NAM")]
    # "09" and "110" are the characters 0 and 1 at positions 9 and 10 of one long word.
    assert sentences[1].text == "在北京wwww.cn/x01记者"
    assert all(not s.extension_spans for s in sentences)


def test_weibo_position_digits_as_segmentation():
    sentences = read_dataset(FIXTURES / "weibo_tiny.conll", position_digits_as_segmentation=True)
    words = [sentences[1].span_text(e) for e in sentences[1].extension_spans]
    assert words == ["在", "北京", "wwww.cn/x01", "记者"]
    assert {(e.label, e.source) for e in sentences[1].extension_spans} == {("SEG", "weibo:seg")}


def test_weibo_digits_kept_when_stripping_disabled():
    sentences = read_dataset(FIXTURES / "weibo_tiny.conll", strip_position_digit=False)
    assert sentences[0].units[0] == "科0" and sentences[0].joiner == " "


def test_weibo_writer_round_trips_position_digits(tmp_path):
    sentences = read_dataset(FIXTURES / "weibo_tiny.conll", position_digits_as_segmentation=True)
    out = tmp_path / "weibo_tiny.conll"
    write_dataset(sentences, out, position_digits=True)
    assert out.read_text(encoding="utf-8") == (FIXTURES / "weibo_tiny.conll").read_text(encoding="utf-8")


def test_lenient_repair_counted_and_strict_raises():
    sentences, report = read_dataset_with_report(FIXTURES / "broken_tiny.bio")
    assert sentences[0].spans == [Span(1, 2, "PER")]
    assert report.repairs == 1 and "broken_tiny.bio:2" in report.repair_examples[0]
    with pytest.raises(DataFormatError, match=r"broken_tiny\.bio:2: I-PER without a preceding B-PER"):
        read_dataset(FIXTURES / "broken_tiny.bio", strict=True)


def test_missing_column_names_file_and_line():
    with pytest.raises(DataFormatError) as info:
        read_dataset(FIXTURES / "missing_column.conll")
    assert "missing_column.conll:2" in str(info.value)
    assert "expected CHAR<TAB>TAG" in str(info.value)


def test_non_utf8_byte_names_file_and_line(tmp_path):
    path = tmp_path / "latin.conll"
    path.write_bytes("张\tO\n三\tO\n\n".encode() + b"caf\xe9\tO\n")
    with pytest.raises(DataFormatError) as info:
        read_dataset(path)
    assert f"{path}:4" in str(info.value)


def test_crlf_and_bom_read_like_lf(tmp_path):
    text = (FIXTURES / "char_tiny.conll").read_text(encoding="utf-8")
    crlf = tmp_path / "char_tiny.conll"
    crlf.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    assert read_dataset(crlf) == read_dataset(FIXTURES / "char_tiny.conll")


def test_crlf_conllu_reads_like_lf(tmp_path):
    text = (FIXTURES / "tiny.conllu").read_text(encoding="utf-8")
    crlf = tmp_path / "tiny.conllu"
    crlf.write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
    assert read_dataset(crlf, task="pos") == read_dataset(FIXTURES / "tiny.conllu", task="pos")


def test_conll_ids_survive_round_trip(tmp_path):
    sentences = [Sentence("custom-id", list("张三"), [Span(0, 2, "PER")]), Sentence("x-1", list("好"))]
    out = tmp_path / "x.conll"
    write_dataset(sentences, out)
    assert read_dataset(out) == sentences
    assert out.read_text(encoding="utf-8").startswith("# id = custom-id\n")


@pytest.mark.parametrize("scheme", ["BIO", "BIOES", "BMES"])
@pytest.mark.parametrize("fixture", ["char_tiny.conll", "token_tiny.conll", "weibo_tiny.conll"])
def test_conll_round_trip(tmp_path, fixture, scheme):
    sentences = read_dataset(FIXTURES / fixture)
    out = tmp_path / fixture
    write_dataset(sentences, out, scheme=scheme)
    assert read_dataset(out) == sentences


def test_weibo_dev_file():
    if not WEIBO_DEV.exists():
        pytest.skip("shared Weibo data not present")
    sentences, report = read_dataset_with_report(WEIBO_DEV, position_digits_as_segmentation=True)
    assert len(sentences) == 270 and report.scheme == "BIO" and report.level == "char"
    labels = {span.label for s in sentences for span in s.spans}
    assert labels == {f"{t}.{k}" for t in ("PER", "ORG", "GPE", "LOC") for k in ("NAM", "NOM")}
    assert sentences[0].id == "dev-0"
    assert not any(ch.isdigit() for ch in sentences[0].text)
    for sentence in sentences:  # the segmentation tiles each sentence
        ends = [e.end for e in sentence.extension_spans]
        starts = [e.start for e in sentence.extension_spans]
        assert starts[0] == 0 and ends[-1] == len(sentence) and starts[1:] == ends[:-1]


# -- CoNLL-U ----------------------------------------------------------------------------


def test_conllu_seg_and_pos_views():
    seg = read_dataset(FIXTURES / "tiny.conllu")
    assert [s.id for s in seg] == ["t1", "t2"]
    assert seg[0].text == "我们去北京。" and seg[0].joiner == ""
    assert seg[0].spans == [Span(0, 2, "W"), Span(2, 3, "W"), Span(3, 5, "W"), Span(5, 6, "W")]
    assert seg[1].text == "好的"  # the 1-2 range is skipped, its words are kept
    pos = read_dataset(FIXTURES / "tiny.conllu", task="pos", extensions=True)
    assert [s.label for s in pos[0].spans] == ["PRON", "VERB", "PROPN", "PUNCT"]
    assert pos[0].extension_spans == [ExtensionSpan(s.start, s.end, "W", "ud:seg") for s in pos[0].spans]


def test_conllu_token_level_language():
    sentences = read_dataset(FIXTURES / "tiny_en.conllu", task="pos")
    assert sentences[0].units == ["I", "like", "it", "."] and sentences[0].joiner == " "
    assert sentences[0].spans[1] == Span(1, 2, "VERB")


@pytest.mark.parametrize("fixture", ["tiny.conllu", "tiny_en.conllu"])
@pytest.mark.parametrize("task", ["seg", "pos"])
def test_conllu_round_trip(tmp_path, fixture, task):
    sentences = read_dataset(FIXTURES / fixture, task=task, extensions=True)
    out = tmp_path / fixture
    write_dataset(sentences, out)
    assert read_dataset(out, task=task, extensions=True) == sentences


def test_conllu_writer_rejects_non_tiling(tmp_path):
    with pytest.raises(ValueError, match="tile"):
        write_dataset([Sentence("a", list("张三在"), [Span(0, 2, "PER")])], tmp_path / "a.conllu")


def test_conllu_bad_column_count(tmp_path):
    path = tmp_path / "bad.conllu"
    path.write_text("# sent_id = a\n1\t我\t我\tPRON\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.conllu:2: .*expected 10 TAB-separated columns"):
        read_dataset(path)


def test_ud_dev_file():
    if not UD_DEV.exists():
        pytest.skip("shared UD data not present")
    sentences = read_dataset(UD_DEV, extensions=True)
    assert len(sentences) == 500 and sentences[0].id == "dev-s1"
    for sentence in sentences:
        assert sentence.spans[0].start == 0 and sentence.spans[-1].end == len(sentence)
        assert all(a.end == b.start for a, b in zip(sentence.spans, sentence.spans[1:]))
        assert {s.label for s in sentence.spans} == {"W"}
    upos = {e.label for s in sentences for e in s.extension_spans}
    assert "NOUN" in upos and "PUNCT" in upos and len(upos) <= 17


# -- JSON Lines ---------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path):
    sentences = read_dataset(FIXTURES / "tiny.jsonl")
    assert sentences[1].units == ["New", "York", "is", "big"] and sentences[1].synthetic
    assert sentences[0].extension_spans == [ExtensionSpan(0, 2, "SEG", "jieba:seg")]
    out = tmp_path / "tiny.jsonl"
    write_dataset(sentences, out)
    assert read_dataset(out) == sentences
    assert [s.to_dict() for s in read_dataset(out)] == [s.to_dict() for s in sentences]


@pytest.mark.parametrize(
    "fixture, line, problem",
    [("bad_json.jsonl", 2, "invalid JSON"), ("out_of_range.jsonl", 1, "outside"), ("missing_id.jsonl", 1, '"id"')],
)
def test_jsonl_errors_name_file_and_line(fixture, line, problem):
    with pytest.raises(DataFormatError) as info:
        read_dataset(FIXTURES / fixture)
    assert f"{fixture}:{line}: " in str(info.value) and problem in str(info.value)


def test_every_format_round_trips_the_same_sentences(tmp_path):
    sentences = read_dataset(FIXTURES / "char_tiny.conll")
    for name in ("a.jsonl", "a.conll", "a.bio"):
        write_dataset(sentences, tmp_path / name)
        back = read_dataset(tmp_path / name)
        assert [(s.units, s.spans) for s in back] == [(s.units, s.spans) for s in sentences]


# -- dispatch ------------------------------------------------------------------------------


def test_format_detection(tmp_path):
    assert detect_format(FIXTURES / "tiny.jsonl") == "jsonl"
    assert detect_format(FIXTURES / "tiny.conllu") == "conllu"
    assert detect_format(FIXTURES / "broken_tiny.bio") == "conll"
    unknown = tmp_path / "data.dat"
    unknown.write_text((FIXTURES / "tiny.conllu").read_text(encoding="utf-8"), encoding="utf-8")
    assert detect_format(unknown) == "conllu"


def test_unknown_option_and_format_are_config_errors():
    with pytest.raises(ConfigError, match="task"):
        read_dataset(FIXTURES / "char_tiny.conll", task="pos")
    with pytest.raises(ConfigError, match="unknown data format"):
        read_dataset(FIXTURES / "char_tiny.conll", format="xml")


def test_explicit_level_option():
    sentences = read_conll(FIXTURES / "char_tiny.conll", level="token")
    assert sentences[0].joiner == " " and sentences[0].units[:2] == ["张", "三"]
