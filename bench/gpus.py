"""Spreading a grid's runs over the GPUs of one machine: one worker process per GPU, each pinned to
its GPU (CUDA_VISIBLE_DEVICES, set before CUDA starts in the worker), so every run has a device
of its own and its step times are those of a GPU alone."""

from __future__ import annotations

import os

HELP = ("spread the runs over these GPUs of this machine, one worker per GPU pinned to it: 'all' "
        "or indices such as 0,1,2,3 (replaces --jobs and --device-slots; default: none)")


def add_gpus_argument(parser) -> None:
    """A grid runner's `--gpus LIST` (bench.sweep, bench.layer_sweep, bench.quality)."""
    parser.add_argument("--gpus", default=None, metavar="LIST", help=HELP)


def check_gpus(gpus, device_setting: str) -> None:
    """`--gpus` against `--device` and this machine, before anything starts: workers pinned to
    GPUs need --device auto or cuda (each worker's GPU is its cuda), and GPUs that exist."""
    if gpus is None:
        return
    import torch

    from sqt.utils import resolve_device
    device = resolve_device(device_setting, name="--device")
    if device.type != "cuda" or device.index is not None:
        raise ValueError(f"--gpus {gpus} with --device {device_setting}: expected --device auto "
                         "or cuda (each worker's GPU is its cuda)")
    parse_gpus(gpus, available=torch.cuda.device_count())


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
