"""Time one training step of the whole model, full span grid vs band form (max_span_length).

Batches are real Weibo sentences of a few lengths; the encoder is the offline e5 (or any
``--encoder``). Prints a markdown table; ``--append`` adds it to bench/RESULTS.md.

    python bench/span_head_speed.py --max-span 16 --batch 16 --threads 2 --append
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from knowfree_core.config import EncoderConfig, ModelConfig
from knowfree_core.formats import read_dataset
from knowfree_core.labels import LabelVocab
from knowfree_core.model.knowfree import KnowFreeModel
from knowfree_core.report.document import markdown_table
from knowfree_core.training import seed_everything

ROOT = Path(__file__).resolve().parents[1]


def step_seconds(model: KnowFreeModel, batch, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        model.loss(batch).backward()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "weibo" / "train.conll")
    parser.add_argument("--encoder", default="offline-e5")
    parser.add_argument("--layers", default="mix")
    parser.add_argument("--max-span", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sentences = sorted(read_dataset(args.data), key=len)
    # Batches of the shortest, median and longest sentences show how cost grows with L.
    picks = {"short": 0, "median": len(sentences) // 2 - args.batch // 2, "longest": len(sentences) - args.batch}
    batches = {name: sentences[start : start + args.batch] for name, start in picks.items()}
    vocab = LabelVocab.from_sentences(sentences, include_extensions=False)
    layers = int(args.layers) if args.layers.isdigit() else args.layers
    rows = []
    for max_span in (None, args.max_span):
        seed_everything(0)
        model = KnowFreeModel.build(
            EncoderConfig(name=args.encoder, unit_mode="char", layers=layers),
            ModelConfig(max_span_length=max_span),
            vocab,
        )
        for name, batch in batches.items():
            length = max(len(s) for s in batch)
            rows.append((name, length, max_span, step_seconds(model, batch, args.repeats)))
    table = []
    for name, length, _, full in [r for r in rows if r[2] is None]:
        band = next(r[3] for r in rows if r[0] == name and r[2] is not None)
        table.append([name, length, f"{full:.2f}", f"{band:.2f}", f"{full / band:.1f}×"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    header = ["batch", "L", "full grid s", f"band s (max_span_length={args.max_span})", "speed-up"]
    text = markdown_table(header, table, align="lrrrr")
    print(text)
    print(f"peak RSS {peak:.0f} MiB")
    if args.append:
        command = "python bench/span_head_speed.py " + " ".join(sys.argv[1:])
        machine = f"{platform.platform()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, {args.threads} threads"
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as out:
            out.write(
                f"\n## Training step, full grid vs band form, {datetime.now():%Y-%m-%d %H:%M}\n\n"
                f"Command: `{command}`  \nMachine: {machine}  \n"
                f"One forward+backward of the whole model (encoder {args.encoder}, layers {args.layers}), "
                f"batch {args.batch}, best of {args.repeats}.\n\n{text}\n"
            )


if __name__ == "__main__":
    main()
