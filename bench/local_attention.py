"""Benchmark: banded local grid attention vs the dense masked nn.MultiheadAttention reference.

For each length L, one forward+backward of each form on the same weights and the same input
grid (B, L, L, D), each in its own child process so that the peak memory of one cannot hide in
the other's high-water mark:

* CPU peak memory = ``ru_maxrss`` after forward+backward minus ``ru_maxrss`` right before it
  (after torch, the module and the input exist) - i.e. what the computation itself added;
* CUDA peak memory = ``torch.cuda.max_memory_allocated`` minus the allocation before it.

The children save their outputs; the parent compares them (max abs difference, must be <= 1e-5).

Needs only torch (no ray). Example:
    python bench/local_attention.py --lengths 64 128 --device cpu
    python bench/local_attention.py --lengths 256 --append      # adds the table to RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
TOLERANCE = 1e-5


@dataclass
class Measurement:
    seconds: float | None = None
    peak_mib: float | None = None
    output: str | None = None
    error: str | None = None


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def run_child(args: argparse.Namespace) -> None:
    """One measurement (``--child banded|dense``); prints a JSON line."""
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    from knowfree_core.model.local_attention import (
        LocalGridAttention,
        dense_local_attention_reference,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    module = LocalGridAttention(
        args.dim,
        args.heads,
        args.window,
        chunk_elements=args.chunk_elements,
        save_projections=args.save_projections,
    ).to(device)
    generator = torch.Generator().manual_seed(args.seed + 1)
    length = args.child_length
    grid = torch.randn(args.batch, length, length, args.dim, generator=generator).to(device)
    grid.requires_grad_(True)
    # Padded batch: the last sample is 3/4 long, so the key padding mask is exercised too.
    lengths = torch.full((args.batch,), length, dtype=torch.long)
    lengths[-1] = max(1, (3 * length) // 4)
    lengths = lengths.to(device)

    def step() -> "torch.Tensor":
        if args.child == "banded":
            out = module(grid, lengths)
        else:
            out = dense_local_attention_reference(module, grid, lengths)
        out.sum().backward()
        return out.detach()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _maxrss_bytes()
    times = []
    out = None
    for _ in range(args.repeats):
        grid.grad = None
        module.zero_grad(set_to_none=True)
        del out
        start = time.perf_counter()
        out = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if cuda else _maxrss_bytes()) - before
    torch.save(out.float().cpu(), args.child_output)
    print(json.dumps({"seconds": min(times), "peak_bytes": peak}))


def measure(args: argparse.Namespace, form: str, length: int, out_dir: Path) -> Measurement:
    output = out_dir / f"{form}_{length}.pt"
    cmd = [
        sys.executable, str(Path(__file__).resolve()),
        "--child", form, "--child-length", str(length), "--child-output", str(output),
        "--batch", str(args.batch), "--dim", str(args.dim), "--heads", str(args.heads),
        "--window", str(args.window), "--device", args.device, "--seed", str(args.seed),
        "--repeats", str(args.repeats), "--threads", str(args.threads),
    ]
    if args.chunk_elements:
        cmd += ["--chunk-elements", str(args.chunk_elements)]
    if args.save_projections:
        cmd.append("--save-projections")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        reason = tail[-1] if tail else f"exit code {proc.returncode}"
        if proc.returncode < 0:
            reason = f"killed by signal {-proc.returncode} (out of memory?)"
        return Measurement(error=reason[:120])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return Measurement(result["seconds"], result["peak_bytes"] / 2**20, str(output))


def max_abs_diff(a: Measurement, b: Measurement) -> float | None:
    if a.output is None or b.output is None:
        return None
    import torch

    return float((torch.load(a.output) - torch.load(b.output)).abs().max())


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def machine_description(device: str, threads: int) -> str:
    import torch

    parts = [
        platform.platform(),
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"{os.cpu_count()} CPUs",
        f"torch threads {threads or torch.get_num_threads()}",
    ]
    cpu = _cpu_model()
    if cpu:
        parts.insert(1, cpu)
    if device == "cuda" and torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    return ", ".join(parts)


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def run_parent(args: argparse.Namespace) -> int:
    header = (
        "| L | dense s | banded s | speed-up | dense peak MiB | banded peak MiB "
        "| memory ratio | max abs diff |"
    )
    lines = [header, "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print(header)
    print(lines[1])
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench_local_attention_") as tmp:
        for length in args.lengths:
            banded = measure(args, "banded", length, Path(tmp))
            skip_dense = args.skip_dense_above is not None and length > args.skip_dense_above
            if skip_dense:
                dense = Measurement(error="skipped")
            else:
                dense = measure(args, "dense", length, Path(tmp))
            diff = max_abs_diff(banded, dense)
            if diff is not None and diff > TOLERANCE:
                failed = True
            speed = dense.seconds / banded.seconds if dense.seconds and banded.seconds else None
            ratio = dense.peak_mib / banded.peak_mib if dense.peak_mib and banded.peak_mib else None
            row = "| {} | {} | {} | {} | {} | {} | {} | {} |".format(
                length,
                dense.error or _fmt(dense.seconds, ".3g"),
                banded.error or _fmt(banded.seconds, ".3g"),
                _fmt(speed, ".1f") + ("×" if speed else ""),
                _fmt(dense.peak_mib, ".0f"),
                _fmt(banded.peak_mib, ".0f"),
                _fmt(ratio, ".1f") + ("×" if ratio else ""),
                _fmt(diff, ".1e"),
            )
            lines.append(row)
            print(row, flush=True)
            for m in (banded, dense):
                if m.output:
                    Path(m.output).unlink(missing_ok=True)
    if failed:
        print(f"FAIL: banded and dense outputs differ by more than {TOLERANCE}", file=sys.stderr)
    if args.append:
        command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        text = "\n".join([
            f"\n## Local attention, {stamp}\n",
            f"Command: `{command}`  ",
            f"Machine: {machine_description(args.device, args.threads)}  ",
            f"Setup: B={args.batch}, D={args.dim}, K={args.heads}, ω={args.window}, "
            f"device={args.device}, save_projections={args.save_projections}, "
            f"chunk_elements={args.chunk_elements or 'default'}, "
            f"one forward+backward (best of {args.repeats}); last sample "
            "padded to 3/4 length. Peak = memory added by forward+backward (CPU: ru_maxrss "
            "delta in a fresh child process; CUDA: max_memory_allocated delta).\n",
            *lines,
            "",
        ])
        with RESULTS.open("a", encoding="utf-8") as handle:
            handle.write(text)
        print(f"appended to {RESULTS}")
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=200)
    parser.add_argument("--heads", type=int, default=10)
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--skip-dense-above", type=int, default=None, metavar="L",
                        help="do not run the dense reference for lengths above L")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per case (best kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-projections", action="store_true",
                        help="banded form keeps q/k/v for backward (faster, more memory)")
    parser.add_argument("--chunk-elements", type=int, default=None,
                        help="banded form's chunk size in grid elements (default: per device)")
    parser.add_argument("--append", action="store_true", help=f"append the table to {RESULTS}")
    # Internal: a single measurement in a child process.
    parser.add_argument("--child", choices=["banded", "dense"], help=argparse.SUPPRESS)
    parser.add_argument("--child-length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-output", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return 0
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
