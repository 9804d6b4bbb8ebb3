"""bench/pseudo_label_quality.py: each gold span of a kept pseudo sentence is counted once, as
taught (same cell and label), left out (an uncertain span on its cell) or taught as "no entity";
precision is over the pseudo spans, and empty sentences holding a gold entity are counted."""

from __future__ import annotations

import sys

from bench_scripts import load_bench_script, markdown_table_rows
from knowfree_core.formats import write_dataset
from knowfree_core.records import Sentence, Span


def test_gold_spans_are_split_into_taught_left_out_and_taught_as_none(tmp_path, monkeypatch, capsys):
    gold = [Sentence("g1", list("张三在北京见李四"), [Span(0, 2, "PER"), Span(3, 5, "LOC"), Span(6, 8, "PER")]),
            Sentence("g2", list("王五来了"), [Span(0, 2, "PER")]),
            Sentence("g3", list("天气很好"))]
    pseudo = [Sentence("g1#pseudo", list("张三在北京见李四"), [Span(0, 2, "PER"), Span(3, 5, "ORG")],
                       uncertain_spans=[Span(6, 8, "PER")], pseudo_labeled=True),
              Sentence("g2#pseudo", list("王五来了"), pseudo_labeled=True),  # empty, but holds a name
              Sentence("g3#pseudo", list("天气很好"), pseudo_labeled=True),
              Sentence("x#pseudo", list("不在金标里"), pseudo_labeled=True)]
    write_dataset(gold, tmp_path / "gold.jsonl")
    write_dataset(pseudo, tmp_path / "pseudo.jsonl")
    script = load_bench_script("pseudo_label_quality")
    counts = script.pseudo_label_counts(tmp_path / "pseudo.jsonl",
                                        {s.text: s for s in gold})
    assert counts["sentences"] == 3 and counts["unmatched"] == 1
    assert counts["empty"] == 2 and counts["empty with gold"] == 1
    assert counts["spans"] == 2 and counts["correct"] == 1
    assert (counts["gold spans"], counts["taught"], counts["left out"], counts["taught as none"]) == (4, 1, 1, 2)

    monkeypatch.setattr(sys, "argv", ["pseudo_label_quality.py", "--gold", str(tmp_path / "gold.jsonl"),
                                      str(tmp_path / "pseudo.jsonl")])
    script.main()
    row = markdown_table_rows(capsys.readouterr().out)[str(tmp_path / "pseudo.jsonl")]
    assert row["precision"] == "0.50" and row["taught as none"] == "2 (0.50)"
