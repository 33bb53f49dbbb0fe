"""Mixture-of-experts feed-forward: a top-k router in fp32 over SwiGLU experts held as stacked
weights, the Switch load-balancing loss and the router z-loss, and two ways to run the experts
(grouped matmuls without host synchronisation, and a reference loop)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LMConfig


def load_balancing_loss(counts: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's loss `E * sum_i f_i * P_i`: f_i the fraction of token-slots routed to
    expert i (`counts` / their sum; no gradient), P_i the mean router probability of expert i over
    the tokens (`probs`: (tokens, E)). 1 when both are uniform, E when one expert takes everything."""
    n_experts = probs.shape[-1]
    fraction = counts.to(probs.dtype) / counts.sum().clamp(min=1)
    return n_experts * (fraction * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss, mean over tokens of logsumexp(logits)^2: keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class MoE(nn.Module):
    """Token-choice top-k routing over `n_experts` SwiGLU experts; no token is ever dropped.

    The router is a bias-free linear map computed in fp32 whatever the autocast, then a softmax over
    all experts and the top k. With k > 1 the k weights are renormalised to sum to 1 (Mixtral, and
    RxNN whose micro MoE models the `sqat-micro` preset copies); with k = 1 the weight stays the
    raw probability as in Switch, since renormalising would make it 1 and leave the router no
    gradient from the task loss. torchtitan makes the renormalisation optional (`route_norm`).

    After each forward, `aux_loss` holds `moe_aux_coef * balance + moe_z_coef * z` for that call
    and the buffer `load` the token-slot count of each expert, both left on the device."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        if not cfg.n_experts:
            raise ValueError("n_experts=0: a dense model has no MoE layer")
        d, ff, n = cfg.d_model, cfg.expert_width, cfg.n_experts
        self.n_experts, self.top_k, self.impl = n, cfg.top_k, cfg.moe_impl
        self.aux_coef, self.z_coef = cfg.moe_aux_coef, cfg.moe_z_coef
        self.router = nn.Linear(d, n, bias=False)
        # Gate columns first, then up, as in the dense SwiGLU's fused `up`. The layout
        # (experts, in, out) is what the grouped matmul reads without a transpose.
        self.w_up = nn.Parameter(torch.randn(n, d, 2 * ff) * 0.02)
        self.w_down = nn.Parameter(torch.randn(n, ff, d) * 0.02)
        self.register_buffer("load", torch.zeros(n, dtype=torch.long), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def route(self, x: torch.Tensor):
        """x: (N, d). Returns the top-k weights (N, k) and expert ids (N, k), the probabilities
        (N, E) and logits (N, E), all fp32."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts, probs, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts, probs, logits = self.route(x)
        flat = experts.flatten()
        # Counted by scatter_add into a fixed-size vector: bincount would read its length from the
        # data (a host synchronisation on CUDA).
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        with torch.no_grad():
            self.load.copy_(counts)
        self.aux_loss = self.aux_coef * load_balancing_loss(counts, probs)
        if self.z_coef:
            self.aux_loss = self.aux_loss + self.z_coef * router_z_loss(logits)
        run = self.grouped if self.impl == "grouped" else self.loop
        return run(x, weights, experts, counts).view(shape)

    def _matmul_dtype(self, x: torch.Tensor) -> torch.dtype:
        # On CUDA only bf16 has a grouped kernel; any other dtype falls back to a per-expert loop
        # that copies the offsets to the host, which a captured graph cannot contain.
        if x.is_cuda:
            return torch.bfloat16
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def grouped(self, x, weights, experts, counts) -> torch.Tensor:
        """Token-slots sorted by expert, one grouped matmul per projection, unsorted and summed
        with their weights. Every step is a fixed-shape device op (argsort, cumsum, index_select,
        scatter): nothing reads a data-dependent size on the host."""
        n_tokens, k = experts.shape
        order = experts.flatten().argsort(stable=True)          # slot s is (token s // k, j = s % k)
        ends = counts.cumsum(0).to(torch.int32)                 # end row of each expert's group
        dtype = self._matmul_dtype(x)
        rows = x.to(dtype).index_select(0, order // k)
        gate, up = torch._grouped_mm(rows, self.w_up.to(dtype), offs=ends).chunk(2, dim=-1)
        out = torch._grouped_mm(F.silu(gate) * up, self.w_down.to(dtype), offs=ends)
        inverse = torch.empty_like(order).scatter_(
            0, order, torch.arange(order.numel(), device=order.device))
        # Back in slot order, each token's k outputs are adjacent: a weighted sum, fp32, with no
        # atomics (so the same on every run).
        out = out.index_select(0, inverse).view(n_tokens, k, -1)
        return (out.float() * weights.unsqueeze(-1)).sum(1).to(x.dtype)

    def loop(self, x, weights, experts, counts=None) -> torch.Tensor:
        """Reference: each expert in turn applied to the tokens that chose it (boolean masks, which
        synchronise with the host; for tests and as a fallback, never for speed)."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(self.n_experts):
            chosen = experts == e                               # (N, k): at most one hit per row
            rows = chosen.any(dim=-1)
            gate, up = (x[rows] @ self.w_up[e]).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ self.w_down[e]
            out[rows] += (weights * chosen).sum(-1)[rows, None] * y.float()
        return out.to(x.dtype)


def cuda_graph_blocker(cfg: LMConfig, device) -> str | None:
    """Why a training step of this model cannot be captured as one CUDA graph on `device` (a
    sentence), or None when nothing in the MoE layers stands in the way."""
    device = torch.device(device)
    if not cfg.n_experts or device.type != "cuda":
        return None
    if cfg.moe_impl == "loop":
        return ("moe_impl='loop' selects each expert's tokens with boolean masks, which "
                "synchronise with the host")
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return (f"torch's grouped matmul kernel needs compute capability 9.x or 10.x; on "
                f"{major}.{minor} it runs a per-expert loop that copies the offsets to the host")
    return None
