"""Training and validation windows: the sampler (a pure function of seed and step, capturable in
a CUDA graph) and the fixed validation windows every run is scored on."""

from __future__ import annotations

import numpy as np
import torch

EVAL_SEED = 1234
"""Validation windows are drawn with this seed whatever the run's seed, so every run (variant, size,
seed) is scored on the very same text."""


def split_tokens(split) -> torch.Tensor:
    """A dataset split as an int64 tensor: a TextDataset's tensor as it is, any array (a memmap of
    a prepared dataset) copied in. The one place the trainer reads a split's tokens."""
    if isinstance(split, torch.Tensor):
        return split.long()
    return torch.from_numpy(np.asarray(split, dtype=np.int64))


class Sampler:
    """Training windows as a pure function of (seed, step): the start offsets for steps
    k*CHUNK .. (k+1)*CHUNK-1 are drawn by a generator seeded with (seed, k). A step's whole batch
    is drawn at once (then split into micro-batches), so what a step sees does not depend on
    gradient accumulation. Resuming needs no sampler state, and the lookup is indexed by a step
    counter on the device, so the whole training step (batch included) can be captured once as a
    CUDA graph. The trainer needs two calls of a sampler: `prepare(step)` on the host before each
    step, `batch(step_t)` on the device inside it (a sampler reading windows from a memmap on the
    host would gather them in `prepare` into a static device buffer that `batch` returns)."""

    CHUNK = 512

    def __init__(self, data: torch.Tensor, batch_size: int, seq_len: int, seed: int):
        if data.numel() <= seq_len + 1:
            raise ValueError(f"seq_len={seq_len}: the training split has only {data.numel()} "
                             "tokens; expected more than seq_len + 1")
        self.data, self.B, self.T, self.seed = data, batch_size, seq_len, seed
        self.offsets = torch.arange(seq_len + 1, device=data.device)
        self.table = torch.empty(self.CHUNK, batch_size, dtype=torch.long, device=data.device)
        self.loaded = None

    def prepare(self, step: int) -> None:
        """Host side, before `step`: load the chunk of start offsets that holds it (in place, so a
        captured graph sees the new values)."""
        k = step // self.CHUNK
        if k != self.loaded:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
            starts = torch.randint(self.data.numel() - self.T - 1, (self.CHUNK, self.B),
                                   generator=gen)
            self.table.copy_(starts)
            self.loaded = k

    def batch(self, step: torch.Tensor):
        """(inputs, targets) for the step held in the 0-dim tensor `step`."""
        # index_select and take never read the index on the host, so this can be captured.
        start = self.table.index_select(0, (step % self.CHUNK).view(1))[0]
        chunk = torch.take(self.data, start[:, None] + self.offsets)
        return chunk[:, :-1], chunk[:, 1:]


def fixed_windows(data: torch.Tensor, n: int, seq_len: int, device):
    """The `n` validation windows, (n, seq_len) inputs and targets, the same for every run."""
    if data.numel() <= seq_len + 1:
        raise ValueError(f"seq_len={seq_len}: the validation split has only {data.numel()} "
                         "tokens; expected more than seq_len + 1")
    gen = torch.Generator().manual_seed(EVAL_SEED)
    start = torch.randint(data.numel() - seq_len - 1, (n,), generator=gen)
    chunk = data[start[:, None] + torch.arange(seq_len + 1)].to(device)
    return chunk[:, :-1], chunk[:, 1:]
