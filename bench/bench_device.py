"""The device and thread set-up the speed benchmarks share (bench/model_throughput.py,
bench/gpu_train_speed.py)."""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch

from knowfree_core.training import resolve_device


def bench_device(device_name: str, threads: Optional[int]) -> Optional[torch.device]:
    """The torch device to time on, with offline hub and quiet tokenizers set for the run and
    ``threads`` torch threads if given; None (after a one-line error on stderr) when CUDA is
    asked for on a machine whose torch sees no GPU."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = resolve_device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return None
    if threads:
        torch.set_num_threads(threads)
    return device
