"""Where a trained model's test errors come from: per label, with training counts, and each
missed gold span classified (wrong type on the right boundaries, overlapping a prediction,
or not found at all).

    python bench/error_analysis.py --run runs/weibo-250-f --data ../shared/data/weibo/test.conll
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from knowfree_core.formats import read_dataset
from knowfree_core.report.document import markdown_table
from knowfree_core.model.knowfree import KnowFreeModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run folder (model/, train_data.jsonl, metrics.json)")
    parser.add_argument("--data", required=True, help="gold file to analyse (test or dev)")
    args = parser.parse_args()
    run = Path(args.run)
    model = KnowFreeModel.from_pretrained(run / "model")
    threshold = json.loads((run / "metrics.json").read_text())["threshold"]
    gold_sentences = read_dataset(args.data)
    predicted = model.decode(model.target_logits(gold_sentences, batch_size=16), threshold=threshold)
    train_counts = Counter(span.label for s in read_dataset(run / "train_data.jsonl") for span in s.spans)

    outcome: dict[str, Counter] = {}
    for sentence, spans in zip(gold_sentences, predicted):
        guessed = {(s.start, s.end): s.label for s in spans}
        for gold in sentence.spans:
            row = outcome.setdefault(gold.label, Counter())
            row["gold"] += 1
            label = guessed.get((gold.start, gold.end))
            if label == gold.label:
                row["correct"] += 1
            elif label is not None:
                row["wrong type"] += 1
            elif any(s.start < gold.end and gold.start < s.end for s in spans):
                row["boundary"] += 1
            else:
                row["not found"] += 1
        for span in spans:
            outcome.setdefault(span.label, Counter())["predicted"] += 1

    columns = ["train", "gold", "predicted", "correct", "wrong type", "boundary", "not found"]
    table = []
    total: Counter = Counter()
    for label in sorted(outcome):
        row = outcome[label]
        row["train"] = train_counts.get(label, 0)
        total.update(row)
        table.append(_table_row(label, row, columns))
    table.append(_table_row("all", total, columns))
    print(markdown_table(["label", *columns, "recall"], table, align="l" + "r" * (len(columns) + 1)))


def _table_row(label: str, counts: Counter, columns: list[str]) -> list[str]:
    recall = counts["correct"] / counts["gold"] if counts["gold"] else 0.0
    return [label, *(str(counts[c]) for c in columns), f"{recall:.2f}"]


if __name__ == "__main__":
    main()
