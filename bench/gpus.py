"""Spreading a grid's runs over the GPUs of one machine: one worker process per GPU, each pinned to
its GPU (CUDA_VISIBLE_DEVICES, set before CUDA starts in the worker), so every run has a device
of its own and its step times are those of a GPU alone."""

from __future__ import annotations

import os


def parse_gpus(text: str, *, available: int) -> list[int]:
    """`--gpus`: "all" or comma-separated indices ("0,1,2,3") of this machine's `available`
    GPUs, each at most once."""
    if text == "all":
        if available < 1:
            raise ValueError("--gpus all: this machine has no CUDA device")
        return list(range(available))
    try:
        gpus = [int(part) for part in text.split(",")]
    except ValueError:
        gpus = []
    if not gpus or len(set(gpus)) != len(gpus) or not all(0 <= g < available for g in gpus):
        raise ValueError(f"--gpus {text!r}: expected 'all' or distinct indices in "
                         f"0..{available - 1} separated by commas (this machine has {available} "
                         "CUDA device(s))")
    return gpus


def pin_to_gpu(gpu: int) -> None:
    """Make GPU `gpu` this process's only CUDA device (it is then cuda:0 here). Must run before
    CUDA starts in the process: a worker's first act."""
    import torch
    if torch.cuda.is_initialized():
        raise RuntimeError(f"pin_to_gpu({gpu}): CUDA has already started in this process; pin a "
                           "worker before it touches the GPU")
    # Indices count the GPUs this process may see: those CUDA_VISIBLE_DEVICES already lists.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[gpu] if visible else str(gpu)
