"""How good a self-training run's pseudo labels are, scored against the pool's gold labels (for
a pool that is a labelled corpus with its labels hidden, as the harness's Weibo pool is).

Per pseudo file: the kept sentences, the precision of their spans, and what became of each gold
span of a kept sentence: taught as an entity (a pseudo span on the same cell and label), left
out of the loss (an uncertain span on its cell: partial annotation), or taught as "no entity"
(neither) -- the last is what makes a self-trained model miss entities.

    python bench/pseudo_label_quality.py --gold ../shared/data/weibo/train.conll \\
        runs/quality/weibo/n250-seed1/pseudo.jsonl runs/quality/weibo/n250-seed1/pseudo_fu_partial.jsonl
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from knowfree_core.formats import read_dataset
from knowfree_core.report.document import markdown_table

COLUMNS = ["sentences", "empty", "empty with gold", "spans", "precision", "gold spans", "taught",
           "left out", "taught as none"]


def pseudo_label_counts(pseudo_file: Path, gold_by_text: dict) -> Counter:
    """The counts of one pseudo file (columns above); sentences whose text is not in the gold
    corpus are skipped and counted as ``unmatched``."""
    counts: Counter = Counter()
    for sample in read_dataset(pseudo_file, format="jsonl"):
        gold = gold_by_text.get(sample.text)
        if gold is None:
            counts["unmatched"] += 1
            continue
        counts["sentences"] += 1
        gold_spans = {(s.start, s.end, s.label) for s in gold.spans}
        taught = {(s.start, s.end, s.label) for s in sample.spans}
        left_out = {(s.start, s.end) for s in sample.uncertain_spans}
        if not sample.spans:
            counts["empty"] += 1
            counts["empty with gold"] += bool(gold_spans)
        counts["spans"] += len(taught)
        counts["correct"] += len(taught & gold_spans)
        counts["gold spans"] += len(gold_spans)
        counts["taught"] += len(gold_spans & taught)
        counts["left out"] += sum(1 for s in gold_spans - taught if (s[0], s[1]) in left_out)
    counts["taught as none"] = counts["gold spans"] - counts["taught"] - counts["left out"]
    return counts


def _share(counts: Counter, part: str, whole: str) -> str:
    return f"{counts[part] / counts[whole]:.2f}" if counts[whole] else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gold", required=True, help="the pool's labelled corpus")
    parser.add_argument("pseudo", nargs="+", help="pseudo*.jsonl files of a pipeline cell")
    args = parser.parse_args()
    gold_by_text = {s.text: s for s in read_dataset(args.gold)}
    rows = []
    for path in args.pseudo:
        counts = pseudo_label_counts(Path(path), gold_by_text)
        values = {**counts, "precision": _share(counts, "correct", "spans")}
        for column in ("taught", "left out", "taught as none"):
            values[column] = f"{counts[column]} ({_share(counts, column, 'gold spans')})"
        rows.append([path, *(values[c] for c in COLUMNS)])
    print(markdown_table(["pseudo file", *COLUMNS], rows, align="l" + "r" * len(COLUMNS)))


if __name__ == "__main__":
    main()
