"""The optimizer of a training run and its learning-rate schedule: AdamW with weight decay on
matmul weights only, linear warm-up, then cosine to the final rate."""

from __future__ import annotations

import math

import torch

from .runconfig import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine to `min_lr` at the last step (of a resolved config).
    `step` counts from 0."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    lo = cfg.final_min_lr
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, *,
                   graphed: bool = False):
    """AdamW; weight decay only on matmul weights. Norms, biases, embeddings and static query
    tables/vectors (which are position embeddings by another name) are not decayed. A captured
    step needs the learning rate as a device tensor and a capturable optimizer."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        embedding_like = name.startswith(("tok_emb", "pos_emb")) or name.endswith(
            ("q_table", "q_vec"))
        (no_decay if p.dim() < 2 or embedding_like else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    lr = torch.tensor(cfg.lr, device=device) if graphed else cfg.lr
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda", capturable=graphed)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> float:
    """Set every group's learning rate to `lr` (in place when it is a device tensor, which a
    captured step reads) and return it."""
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    return lr
