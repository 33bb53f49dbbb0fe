"""Watching a training run for a loss that stops being finite, without a host synchronisation per
step: the step records the first non-finite value on the device (capturable in a CUDA graph), and
the loop reads that record only where it synchronises anyway (evaluations, checkpoints)."""

from __future__ import annotations

from typing import Optional

import torch


class NonFiniteLoss(RuntimeError):
    """The training loss, the gradient norm or the validation loss became NaN or infinite. `step`
    is the first such step; `kept_step` the step of the checkpoint kept (None: none written)."""

    def __init__(self, *, what: str, value: float, step: int, kept_step: Optional[int], where):
        self.what, self.value, self.step, self.kept_step = what, value, step, kept_step
        if where is None:
            kept = "nothing is saved (no out_dir)"
        elif kept_step is None:
            kept = "no checkpoint had been written yet"
        else:
            kept = f"the last good checkpoint, of step {kept_step}, is kept in {str(where)!r}"
        super().__init__(f"the {what} became {value} at step {step}: training stopped, and "
                         f"{kept}; a lower lr, a longer warmup or grad_clip may keep it finite")


class FiniteWatch:
    """The first step (counted from 0) whose watched value was not finite (-1: none yet), that
    value and which kind it was, as device tensors."""

    KINDS = ("training loss", "gradient norm")

    def __init__(self, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.value = torch.zeros((), device=device)
        self.kind = torch.zeros((), dtype=torch.long, device=device)

    def note(self, value: torch.Tensor, kind: int, step: torch.Tensor) -> None:
        """Inside the step: record `value` if it is the first non-finite one. No sync."""
        first = ~torch.isfinite(value.detach()) & (self.step < 0)
        self.step.copy_(torch.where(first, step, self.step))
        self.value.copy_(torch.where(first, value.detach().float(), self.value))
        self.kind.copy_(torch.where(first, kind, self.kind))

    def check(self, *, kept_step: Optional[int], where) -> None:
        """At a sync point: raise NonFiniteLoss if a step since the start was not finite."""
        step = int(self.step)
        if step >= 0:
            raise NonFiniteLoss(what=self.KINDS[int(self.kind)], value=float(self.value),
                                step=step + 1, kept_step=kept_step, where=where)
