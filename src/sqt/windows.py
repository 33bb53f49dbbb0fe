"""Training and validation windows: the two training feeds (windows gathered on the device from
the uploaded split, or on the host from the memmap), both a pure function of (seed, step) and
both capturable in a CUDA graph, and the fixed validation windows every run is scored on."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from .data import gather_windows

EVAL_SEED = 1234
"""Validation windows are drawn with this seed whatever the run's seed, so every run (variant, size,
seed) is scored on the very same text."""

CHUNK = 512
"""Steps whose window starts are drawn by one generator call (one seed per chunk of steps)."""

UPLOAD_SHARE = 0.1
"""`data_on_device=None` uploads the training split when its int64 tokens take at most this share
of the device's free memory (of the free RAM on the CPU); larger splits stream from the host."""

UPLOAD_PIECE = 1 << 24
"""Tokens converted to int64 and uploaded per copy, so an upload never holds the whole split twice
in host memory."""


def chunk_starts(n_tokens: int, batch_size: int, seq_len: int, seed: int, k: int) -> torch.Tensor:
    """The (CHUNK, batch_size) window starts of steps k*CHUNK .. (k+1)*CHUNK-1: the one definition
    of which text a step trains on, shared by both feeds."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
    return torch.randint(n_tokens - seq_len - 1, (CHUNK, batch_size), generator=gen)


def share_rows(batch_size: int, share: tuple[int, int]) -> slice:
    """The rows of a step's batch that process `rank` of `world` takes (`share` = (rank,
    world)): an equal, contiguous slice, so the batch a step trains on is the same for any number
    of processes."""
    rank, world = share
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size}: expected a multiple of the {world} "
                         "processes, each taking an equal share of every batch")
    per = batch_size // world
    return slice(rank * per, (rank + 1) * per)


def _check_length(n_tokens: int, seq_len: int, split: str) -> None:
    if n_tokens <= seq_len + 1:
        raise ValueError(f"seq_len={seq_len}: the {split} split has only {n_tokens} tokens; "
                         "expected more than seq_len + 1")


class Sampler:
    """The device feed: the whole split on the device, windows gathered there. A step's whole
    batch is drawn at once (then split into micro-batches), so what a step sees does not depend
    on gradient accumulation (or on how many processes share it: each takes its `share` of the
    rows, see share_rows). Resuming needs no sampler state, and the lookup is indexed by a step
    counter on the device, so the whole training step (batch included) can be captured once as a
    CUDA graph. The trainer makes two calls of a feed: `prepare(step)` on the host before each
    step, `batch(step_t)` on the device inside it."""

    kind = "device"

    def __init__(self, data: torch.Tensor, batch_size: int, seq_len: int, seed: int, *,
                 share: tuple[int, int] = (0, 1)):
        _check_length(data.numel(), seq_len, "training")
        self.data, self.B, self.T, self.seed = data, batch_size, seq_len, seed
        self.rows = share_rows(batch_size, share)
        self.offsets = torch.arange(seq_len + 1, device=data.device)
        self.table = torch.empty(CHUNK, self.rows.stop - self.rows.start, dtype=torch.long,
                                 device=data.device)
        self.loaded = None

    def prepare(self, step: int) -> None:
        """Host side, before `step`: load the chunk of start offsets that holds it (in place, so a
        captured graph sees the new values)."""
        k = step // CHUNK
        if k != self.loaded:
            self.table.copy_(chunk_starts(self.data.numel(), self.B, self.T, self.seed,
                                          k)[:, self.rows])
            self.loaded = k

    def batch(self, step: torch.Tensor):
        """(inputs, targets) for the step held in the 0-dim tensor `step`."""
        # index_select and take never read the index on the host, so this can be captured.
        start = self.table.index_select(0, (step % CHUNK).view(1))[0]
        chunk = torch.take(self.data, start[:, None] + self.offsets)
        return chunk[:, :-1], chunk[:, 1:]


class HostFeed:
    """The host feed: the split stays where it is (a memmap: only the windows' pages are read) and
    `prepare(step)` gathers the step's windows on the host into one of two pinned buffers, then
    copies it (non_blocking, on the current stream, so after the step before has read it) into
    the one device buffer that `batch` returns and a captured step reads. The host prepares step
    s + 1 while the device runs step s; an event per pinned buffer keeps a buffer from being
    rewritten before its copy has run, the only wait on the device. On the CPU it is a plain
    gather into the batch buffer. Same windows as `Sampler` for the same (seed, step)."""

    kind = "host"

    def __init__(self, split, batch_size: int, seq_len: int, seed: int, device, *,
                 share: tuple[int, int] = (0, 1)):
        self.split = split.numpy() if isinstance(split, torch.Tensor) else split
        _check_length(len(self.split), seq_len, "training")
        self.B, self.T, self.seed = batch_size, seq_len, seed
        self.rows = share_rows(batch_size, share)
        device = torch.device(device)
        self.buffer = torch.empty(self.rows.stop - self.rows.start, seq_len + 1,
                                  dtype=torch.long, device=device)
        self.pinned, self.events, self.turn = [], [], 0
        if device.type == "cuda":
            self.pinned = [torch.empty_like(self.buffer, device="cpu").pin_memory()
                           for _ in range(2)]
            self.events = [torch.cuda.Event() for _ in range(2)]
        self.table, self.loaded = None, None

    def prepare(self, step: int) -> None:
        k = step // CHUNK
        if k != self.loaded:
            self.table = chunk_starts(len(self.split), self.B, self.T, self.seed,
                                      k)[:, self.rows].numpy()
            self.loaded = k
        starts = self.table[step % CHUNK]
        if not self.pinned:
            gather_windows(self.split, starts, self.T, out=self.buffer.numpy())
            return
        i, self.turn = self.turn, 1 - self.turn
        self.events[i].synchronize()   # the copy that last read this pinned buffer has run
        gather_windows(self.split, starts, self.T, out=self.pinned[i].numpy())
        self.buffer.copy_(self.pinned[i], non_blocking=True)
        self.events[i].record()

    def batch(self, step: torch.Tensor):
        """(inputs, targets) of the step last prepared; `step` is not read (the host chose)."""
        return self.buffer[:, :-1], self.buffer[:, 1:]


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):   # no sysconf: do not assume room
        return 0


def data_on_device(setting: Optional[bool], n_tokens: int, device) -> bool:
    """Whether the training split is uploaded (the `data_on_device` setting; None decides by size
    against free memory, UPLOAD_SHARE)."""
    if setting is not None:
        return setting
    return n_tokens * 8 <= UPLOAD_SHARE * _free_bytes(torch.device(device))


def upload(split, device) -> torch.Tensor:
    """A split as an int64 tensor on `device`, copied a piece at a time."""
    if isinstance(split, torch.Tensor):
        return split.to(device=device, dtype=torch.long)
    out = torch.empty(len(split), dtype=torch.long, device=device)
    for i in range(0, len(split), UPLOAD_PIECE):
        piece = np.asarray(split[i:i + UPLOAD_PIECE], dtype=np.int64)
        out[i:i + len(piece)].copy_(torch.from_numpy(piece))
    return out


def make_feed(split, *, batch_size: int, seq_len: int, seed: int, device,
              on_device: Optional[bool], share: tuple[int, int] = (0, 1)):
    """The training feed for `split`: a `Sampler` over the uploaded split or a `HostFeed` over the
    split where it is (`on_device`: True, False, or None to decide by size). `share`: (rank,
    world size) of a process that takes its share of every batch (share_rows)."""
    if data_on_device(on_device, len(split), device):
        return Sampler(upload(split, device), batch_size, seq_len, seed, share=share)
    return HostFeed(split, batch_size, seq_len, seed, device, share=share)


def fixed_windows(data, n: int, seq_len: int, device):
    """The `n` validation windows, (n, seq_len) inputs and targets, the same for every run; only
    the windows are read from `data` (an array, a memmap or a tensor)."""
    data = data.numpy() if isinstance(data, torch.Tensor) else data
    _check_length(len(data), seq_len, "validation")
    gen = torch.Generator().manual_seed(EVAL_SEED)
    start = torch.randint(len(data) - seq_len - 1, (n,), generator=gen)
    chunk = torch.from_numpy(gather_windows(data, start.numpy(), seq_len)).to(device)
    return chunk[:, :-1], chunk[:, 1:]
