"""Benchmark: banded local grid attention vs dense masked nn.MultiheadAttention.

For each length L, one forward+backward of each form on the same weights and the same input
grid (B, L, L, D) (the last sample padded to 3/4 length), each in its own child process so that
the peak memory of one cannot hide in the other's high-water mark. The forms:

* ``reference`` - the dense form the issue measured and the published KnowFREE code runs: an
  ``nn.MultiheadAttention(D, K, batch_first=True)`` holding the banded module's weights, called
  the ordinary way over the B·L grid rows, ``attn(x, x, x, attn_mask=band,
  key_padding_mask=padding)`` with ``need_weights`` left at its default (True), so it also
  materialises and head-averages the (B·L, K, L, L) attention weights and no fused kernel runs;
* ``sdpa`` - the same dense masked attention through ``F.multi_head_attention_forward`` with
  ``need_weights=False`` (the fused scaled-dot-product path): the fastest stock dense form,
  shown so the table is honest about both;
* ``banded`` - :class:`LocalGridAttention`, O(L²·(2ω+1)).

Peak memory is measured per child:

* CPU peak memory = ``ru_maxrss`` after forward+backward minus ``ru_maxrss`` right before it
  (after torch, the module and the input exist) - i.e. what the computation itself added;
* CUDA peak memory = ``torch.cuda.max_memory_allocated`` minus the allocation before it.

The children save their outputs; the parent compares banded against both dense forms (max abs
difference, must be <= 1e-5). The issue's target, checked at L=256: banded at least 4× faster and
with 5× less peak memory than the reference form, outputs equal within 1e-5.

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
    """One measurement (``--child banded|reference|sdpa``); prints a JSON line."""
    import torch
    from torch import nn

    from knowfree_core.model.local_attention import (
        LocalGridAttention,
        dense_local_attention_reference,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    options = {"chunk_elements": args.chunk_elements}
    if args.save_projections is not None:
        options["save_projections"] = args.save_projections
    module = LocalGridAttention(args.dim, args.heads, args.window, **options).to(device)
    generator = torch.Generator().manual_seed(args.seed + 1)
    length = args.child_length
    grid = torch.randn(args.batch, length, length, args.dim, generator=generator).to(device)
    grid.requires_grad_(True)
    # Padded batch: the last sample is 3/4 long, so the key padding mask is exercised too.
    lengths = torch.full((args.batch,), length, dtype=torch.long)
    lengths[-1] = max(1, (3 * length) // 4)
    lengths = lengths.to(device)
    key_mask = torch.arange(length, device=device)[None, :] < lengths[:, None]  # (B, L)

    attention = None
    if args.child == "reference":
        # The published form: a stock nn.MultiheadAttention with the banded module's weights.
        attention = nn.MultiheadAttention(args.dim, args.heads, batch_first=True).to(device)
        attention.load_state_dict(module.state_dict())  # strict: same names and shapes

    def reference_step() -> "torch.Tensor":
        batch, rows, dim = args.batch, length, args.dim
        positions = torch.arange(length, device=device)
        band = (positions[:, None] - positions[None, :]).abs() <= args.window
        # Additive float masks with a large finite negative (not -inf): a fully masked padding
        # position then stays finite instead of NaN; it is zeroed below like in the banded form.
        attn_mask = torch.zeros(length, length, device=device).masked_fill_(~band, -1e9)
        row_keys = key_mask[:, None, :].expand(batch, rows, length).reshape(-1, length)
        padding = torch.zeros(batch * rows, length, device=device).masked_fill_(~row_keys, -1e9)
        x = grid.reshape(batch * rows, length, dim)
        out, _weights = attention(x, x, x, attn_mask=attn_mask, key_padding_mask=padding)
        return out.view(batch, rows, length, dim).masked_fill(~key_mask[:, None, :, None], 0.0)

    def step() -> "torch.Tensor":
        if args.child == "banded":
            out = module(grid, lengths)
        elif args.child == "reference":
            out = reference_step()
        else:  # "sdpa": F.multi_head_attention_forward(..., need_weights=False)
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
        if attention is not None:
            attention.zero_grad(set_to_none=True)
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
    if args.save_projections is not None:
        cmd.append("--save-projections" if args.save_projections else "--no-save-projections")
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

    return float((torch.load(a.output, weights_only=True) - torch.load(b.output, weights_only=True)).abs().max())


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def machine_description(device: str, threads: int, load_before: float | None = None) -> str:
    import torch

    parts = [
        platform.platform(),
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"{os.cpu_count()} CPUs",
        f"torch threads {threads or torch.get_num_threads()}",
    ]
    if load_before is not None:
        parts.append(f"1-min load average {load_before:.1f} before the run (shared CPU)")
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


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def _times(value: float | None) -> str:
    return _fmt(value, ".1f") + ("×" if value is not None else "")


def run_parent(args: argparse.Namespace) -> int:
    header = (
        "| L | dense (reference form) s | dense SDPA s | banded s | speed-up vs reference "
        "| speed-up vs SDPA | reference peak MiB | SDPA peak MiB | banded peak MiB "
        "| memory ratio vs reference | max abs diff |"
    )
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    lines = [header, "|" + "---:|" * 11]
    print(header)
    print(lines[1])
    failed = False
    verdicts: dict[int, tuple[float | None, float | None, float | None]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_local_attention_") as tmp:
        for length in args.lengths:
            banded = measure(args, "banded", length, Path(tmp))
            skip_dense = args.skip_dense_above is not None and length > args.skip_dense_above
            if skip_dense:
                reference = Measurement(error="skipped")
            else:
                reference = measure(args, "reference", length, Path(tmp))
            if skip_dense or args.skip_sdpa:
                sdpa = Measurement(error="skipped")
            else:
                sdpa = measure(args, "sdpa", length, Path(tmp))
            diffs = [d for d in (max_abs_diff(banded, reference), max_abs_diff(banded, sdpa))
                     if d is not None]
            diff = max(diffs) if diffs else None
            if diff is not None and diff > TOLERANCE:
                failed = True
            speed_ref = _ratio(reference.seconds, banded.seconds)
            speed_sdpa = _ratio(sdpa.seconds, banded.seconds)
            memory_ref = _ratio(reference.peak_mib, banded.peak_mib)
            verdicts[length] = (speed_ref, memory_ref, diff)
            row = "| {} |".format(length) + "".join(f" {cell} |" for cell in (
                reference.error or _fmt(reference.seconds, ".3g"),
                sdpa.error or _fmt(sdpa.seconds, ".3g"),
                banded.error or _fmt(banded.seconds, ".3g"),
                _times(speed_ref),
                _times(speed_sdpa),
                _fmt(reference.peak_mib, ".0f"),
                _fmt(sdpa.peak_mib, ".0f"),
                _fmt(banded.peak_mib, ".0f"),
                _times(memory_ref),
                _fmt(diff, ".1e"),
            ))
            lines.append(row)
            print(row, flush=True)
            for m in (banded, reference, sdpa):
                if m.output:
                    Path(m.output).unlink(missing_ok=True)
    issue_setup = (args.batch, args.dim, args.heads, args.window) == (4, 200, 10, 3)
    verdict = (
        target_verdict(verdicts)
        if issue_setup
        else "Target: no verdict, the setup differs from the issue's (B=4, D=200, K=10, ω=3)."
    )
    print(verdict)
    if failed:
        print(f"FAIL: banded and dense outputs differ by more than {TOLERANCE}", file=sys.stderr)
    if args.append:
        command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        save, chunk = _effective_options(args)
        text = "\n".join([
            f"\n## Local attention, {stamp}\n",
            f"Command: `{command}`  ",
            f"Machine: {machine_description(args.device, args.threads, load_before)}  ",
            f"Setup: B={args.batch}, D={args.dim}, K={args.heads}, ω={args.window}, "
            f"device={args.device}, save_projections={save}, chunk_elements={chunk}, "
            f"one forward+backward (best of {args.repeats}); last sample "
            "padded to 3/4 length. Dense reference form = nn.MultiheadAttention called with "
            "band + key-padding masks, need_weights left at its default (True); dense SDPA = "
            "F.multi_head_attention_forward with need_weights=False. Peak = memory added by "
            "forward+backward (CPU: ru_maxrss delta in a fresh child process; CUDA: "
            "max_memory_allocated delta). Max abs diff = banded vs both dense forms.\n",
            *lines,
            "",
            verdict,
            "",
        ])
        with RESULTS.open("a", encoding="utf-8") as handle:
            handle.write(text)
        print(f"appended to {RESULTS}")
    return 1 if failed else 0


def _effective_options(args: argparse.Namespace) -> tuple[str, str]:
    """The banded module's save_projections / chunk_elements as run, defaults spelled out."""
    import inspect

    from knowfree_core.model import local_attention as la

    if args.save_projections is None:
        default = inspect.signature(la.LocalGridAttention).parameters["save_projections"].default
        save = f"{default} (module default)"
    else:
        save = str(args.save_projections)
    if args.chunk_elements:
        chunk = str(args.chunk_elements)
    else:
        value = (
            la._DEFAULT_CHUNK_ELEMENTS_CUDA if args.device == "cuda"
            else la._DEFAULT_CHUNK_ELEMENTS_CPU
        )
        chunk = f"{value} (module default for {args.device})"
    return save, chunk


def target_verdict(
    verdicts: dict[int, tuple[float | None, float | None, float | None]], length: int = 256
) -> str:
    """The issue's target at L=256: ≥4× faster, ≥5× less peak memory, diff ≤ 1e-5."""
    if length not in verdicts or None in verdicts[length]:
        return f"Target at L={length}: not measured in this run."
    speed, memory, diff = verdicts[length]
    met = speed >= 4.0 and memory >= 5.0 and diff <= TOLERANCE
    return (
        f"Target at L={length} (≥4× faster and ≥5× less peak memory than the dense reference "
        f"form, max abs diff ≤ {TOLERANCE:g}): {'MET' if met else 'NOT MET'} - "
        f"{speed:.1f}× faster, {memory:.1f}× less memory, max abs diff {diff:.1e}."
    )


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
                        help="do not run either dense form for lengths above L")
    parser.add_argument("--skip-sdpa", action="store_true",
                        help="do not run the dense SDPA form (need_weights=False)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per case (best kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-projections", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="banded form keeps q/k/v and weights for backward (default: the "
                        "module's default, True)")
    parser.add_argument("--chunk-elements", type=int, default=None,
                        help="banded form's chunk size in grid elements (default: per device)")
    parser.add_argument("--append", action="store_true", help=f"append the table to {RESULTS}")
    # Internal: a single measurement in a child process.
    parser.add_argument("--child", choices=["banded", "reference", "sdpa"],
                        help=argparse.SUPPRESS)
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
