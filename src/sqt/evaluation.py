"""Scoring a model on the fixed validation windows: loss, accuracy and mixture-of-experts load, in
one process or split across the processes of a distributed run with the very same result."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .distributed import Parallel


@torch.inference_mode()
def evaluate(model, xs, ys, autocast, *, micro_batch: int,
             parallel: Optional[Parallel] = None) -> tuple[float, float, Optional[list]]:
    """Mean loss (nats/token), next-token accuracy and, for a mixture of experts, each layer's
    fraction of token-slots per expert, over the windows, in eval mode, a micro-batch at a time.
    Several processes take every world_size-th micro-batch each and add up their sums, per
    micro-batch, so the figures are exactly those of one process evaluating them all."""
    parallel = parallel or Parallel(xs.device)
    was = model.training
    model.eval()
    batches = list(zip(xs.split(micro_batch), ys.split(micro_batch)))
    losses = torch.zeros(len(batches), device=xs.device, dtype=torch.float64)
    correct = torch.zeros((), device=xs.device, dtype=torch.long)
    slots = torch.zeros(len(model.moe_layers()), model.config.n_experts, device=xs.device,
                        dtype=torch.long)
    mine = range(parallel.rank, len(batches), parallel.world_size)
    # A sharded forward all-gathers with every rank: all run as many forwards (one left over
    # scores nothing).
    turns = -(-len(batches) // parallel.world_size) if parallel.sharded else len(mine)
    for turn in range(turns):
        i = mine[turn] if turn < len(mine) else None
        x, y = batches[0 if i is None else i]
        with autocast():
            logits = model(x)
        if i is None:
            continue
        losses[i] = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        correct += (logits.argmax(-1) == y).sum()
        if model.moe_layers():
            slots += torch.stack(model.expert_load())
    for total in (losses, correct, slots) if slots.numel() else (losses, correct):
        parallel.sum_(total)       # each sum's other terms are zeros: exact
    model.train(was)
    n = ys.numel()
    load = (slots / slots.sum(-1, keepdim=True)).tolist() if model.moe_layers() else None
    return losses.sum().item() / n, correct.item() / n, load
