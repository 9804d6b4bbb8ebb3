"""Time the offline annotators over a Weibo CoNLL file and count the labels they produce.

    python bench/annotators.py [--path ../shared/data/weibo/train.conll] [--annotators lac jieba]

Prints markdown: speed per annotator (model load timed apart from annotation), label
counts per source, and rejection counts per reason.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from knowfree_core.annotators.base import STEPS, get_annotator
from knowfree_core.formats import read_dataset
from knowfree_core.report.document import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "weibo" / "train.conll")
    parser.add_argument("--annotators", nargs="+", default=["lac", "jieba"])
    args = parser.parse_args()

    sentences = read_dataset(args.path)
    chars = sum(len(s) for s in sentences)
    print(f"{args.path}: {len(sentences)} sentences, {chars} characters, steps {STEPS}\n")

    speed_rows: list[list[str]] = []
    labels: Counter[tuple[str, str]] = Counter()
    reasons: Counter[tuple[str, str]] = Counter()
    for name in args.annotators:
        annotator = get_annotator(name)
        started = time.perf_counter()
        annotator.annotate(sentences[:1], STEPS)  # loads the model
        loaded = time.perf_counter()
        results = annotator.annotate(sentences, STEPS)
        done = time.perf_counter()
        for result in results:
            labels.update((span.source, span.label) for span in result.spans)
            reasons.update((name, rejection.reason) for rejection in result.rejections)
        seconds = done - loaded
        speed_rows.append([name, f"{loaded - started:.2f}", f"{seconds:.2f}", f"{len(sentences) / seconds:.0f}",
                           f"{chars / seconds:.0f}"])

    print(markdown_table(["annotator", "load s", "annotate s", "sentences/s", "chars/s"], speed_rows, align="lrrrr"))
    by_source = sorted(labels.items(), key=lambda item: (item[0][0], -item[1], item[0][1]))
    print("\n" + markdown_table(["source", "label", "count"], [[s, label, n] for (s, label), n in by_source], align="llr"))
    rejected = [[name, reason, n] for (name, reason), n in sorted(reasons.items())] or [["-", "none", 0]]
    print("\n" + markdown_table(["annotator", "rejection", "count"], rejected, align="llr"))


if __name__ == "__main__":
    main()
