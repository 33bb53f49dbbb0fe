"""The attention op alone. `attend` is causal attention over a whole sequence from position 0,
through one registry of backends with one signature: `sdpa` (default), `flex` (sliding windows),
`flash` (FlashAttention-4, sqt.flash) and `eager` (the reference the tests compare against).
`attend_cached` is the op of a decode step: queries over a view of a KV cache, with an additive
mask built from device positions. A query sees keys at or before its own position (and, with a
window w, fewer than w back)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import flash
from .flash import flash_attention


@dataclass(frozen=True)
class FlashWin:
    """From which sequence length FlashAttention-4 beat cuDNN at one head dim, for a forward
    alone and for a forward with its backward (None: it never did), and the measurement."""
    min_seq_forward: Optional[int]
    min_seq_train: Optional[int]
    measured: str


# Where `auto` runs full causal layers on `flash` (installed, on a GPU of compute capability 9.0
# or newer): these head dims, from these lengths; everywhere else on `sdpa` (cuDNN). Time ratios
# cuDNN / FA4 on the H100, causal, bf16, 16 heads, batch x length = 32 x 1k, 8 x 4k, 1 x 32k
# (bench/results/probes/20261124-fa4/fa4_probe.json; 64 x 1k at head dim 16). Head dim 16 is
# absent: FA4's backward is wrong there and its forward ran 0.81x. Windowed layers stay on flex
# until a run compares flash with it. `python -m bench.throughput --families sdpa,flash` measures
# the same ratios in the model; this table is refreshed from its runs.
AUTO_FLASH: dict[int, FlashWin] = {
    64: FlashWin(min_seq_forward=32768, min_seq_train=4096,
                 measured="forward 0.82x at 1k, 1.14x at 32k; forward+backward 1.02x at 1k, "
                          "1.26x at 32k (4k not measured)"),
    128: FlashWin(min_seq_forward=32768, min_seq_train=4096,
                  measured="forward 0.79x at 1k, 0.94x at 4k, 1.02x at 32k; forward+backward "
                           "0.96x at 1k, 1.09x at 4k, 1.17x at 32k"),
}


def check_backend(requested: str, window: Optional[int], *,
                  head_dim: Optional[int] = None) -> None:
    """What can be refused before knowing the device: an unknown name, a window on sdpa, a head
    dim FlashAttention-4 has no kernel for. A layer checks this when it is built."""
    if requested != "auto" and requested not in ATTENTION_FUNCTIONS:
        raise ValueError(f"backend={requested!r}: expected one of auto, "
                         f"{', '.join(ATTENTION_FUNCTIONS)}")
    if requested == "sdpa" and window:
        raise ValueError(
            f"backend='sdpa' with window={window}: SDPA has no sliding-window kernel; "
            "use backend 'flex', 'eager' or 'auto' for windowed layers")
    reason = requested == "flash" and head_dim and flash.head_dim_reason(head_dim)
    if reason:
        raise ValueError(f"backend='flash': {reason}")


def auto_picks_flash(device: torch.device, head_dim: Optional[int], seq_len: Optional[int],
                     grad: bool) -> bool:
    """Whether `auto` runs a full causal layer on FlashAttention-4 (see AUTO_FLASH)."""
    win = AUTO_FLASH.get(head_dim) if device.type == "cuda" else None
    least = win and (win.min_seq_train if grad else win.min_seq_forward)
    return bool(least and seq_len and seq_len >= least
                and flash.unavailable_reason(device, head_dim=head_dim, grad=grad) is None)


def resolve_backend(requested: str, window: Optional[int], device="cuda", *,
                    head_dim: Optional[int] = None, seq_len: Optional[int] = None,
                    grad: bool = False) -> str:
    """The backend a layer runs on `device` (a torch.device or its type) for `seq_len` tokens,
    with a backward pass if `grad`. `auto` picks, for full causal layers, flash where AUTO_FLASH
    says it is faster and sdpa elsewhere; for windowed ones flex on CUDA and eager elsewhere
    (FlexAttention has no CPU backward). Never falls back silently: a window on a backend that
    cannot apply one, or `flash` where it cannot run, is an error that says why."""
    check_backend(requested, window, head_dim=head_dim)
    device = torch.device(device)
    if requested == "auto":
        if window:
            return "flex" if device.type == "cuda" else "eager"
        return "flash" if auto_picks_flash(device, head_dim, seq_len, grad) else "sdpa"
    if requested == "flash":
        reason = flash.unavailable_reason(device, head_dim=head_dim, grad=grad)
        if reason:
            raise ValueError(f"backend='flash': {reason}")
    return requested


def allowed_mask(q_pos: torch.Tensor, k_pos: torch.Tensor,
                 window: Optional[int]) -> torch.Tensor:
    """Boolean (T, S): True where the query at q_pos[i] may attend to the key at k_pos[j]."""
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = diff >= 0
    if window:
        allowed = allowed & (diff < window)
    return allowed


def cached_bias(positions: torch.Tensor, view_len: int, window: Optional[int] = None, *,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive (T, view_len) mask of queries at `positions` (a device tensor) over the first
    `view_len` cached keys: 0 where a query may look, -inf elsewhere, so positions not written
    yet are never read. Built from device memory only, so a captured graph can replay it; a
    model builds it once per forward and window and hands it to every layer."""
    keys = torch.arange(view_len, device=positions.device)
    allowed = allowed_mask(positions, keys, window)
    return torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill_(
        ~allowed, float("-inf"))


def _broadcast_queries(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Reverse SQA: fewer query heads than K/V heads. Query head h serves K/V heads
    h*G .. h*G+G-1, so queries are repeated (they are the small side) and K/V stay as they are.
    The copy is laid out (B, T, H, D) in memory, as the fused projection's views are, so every
    kernel (and its output) sees the same layout."""
    return q.transpose(1, 2).repeat_interleave(n_kv // q.shape[1], dim=2).transpose(1, 2)


def _reference(q, k, v, bias: torch.Tensor) -> torch.Tensor:
    """Attention written out, K/V repeated per query group, with an additive (T, S) mask."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    acc = torch.promote_types(q.dtype, torch.float32)   # softmax in fp32 at least
    return torch.softmax(scores.to(acc) + bias.to(acc), dim=-1).to(q.dtype) @ v


def sdpa_attention(q, k, v, window: Optional[int] = None):
    if window:
        raise ValueError(f"window={window}: the sdpa backend cannot apply a sliding window")
    return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                          enable_gqa=q.shape[1] != k.shape[1])


def eager_attention(q, k, v, window: Optional[int] = None):
    return _reference(q, k, v, cached_bias(torch.arange(q.shape[2], device=q.device),
                                           k.shape[2], window))


_block_masks: dict = {}
_compiled_flex: Optional[Callable] = None

# FlexAttention forward kernel options by head dim, on CUDA (e.g. {16: {"fwd_BLOCK_M": 64,
# "fwd_BLOCK_N": 128}}); head dims not listed keep torch's choice. Empty on purpose: at 200k tokens
# no tile tried beat torch's default by more than 1 % for head dim 16
# (bench/results/probes/20261123T1705-flex-tiles-200k), so there is nothing to override yet.
FLEX_FORWARD_TILES: dict[int, dict] = {}


def _flex_fn(device: torch.device) -> Callable:
    """FlexAttention is a template that must be compiled to be fast; on CPU the uncompiled
    reference path is used (it is what tests run)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        # Each (shape, dtype, grad mode) compiles once; never fall back to the unfused reference.
        from .utils import allow_many_recompiles
        allow_many_recompiles()
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_block_mask(T: int, window: Optional[int], device):
    """Block-sparse mask for causal (+ window) attention over T positions; fully masked tiles are
    skipped. Built once per shape and cached (building is set-up, not attention)."""
    from torch.nn.attention.flex_attention import create_block_mask
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (T, window, str(device))
    if key not in _block_masks:
        def mask_mod(b, h, q_idx, kv_idx):
            diff = q_idx - kv_idx
            ok = diff >= 0
            return (ok & (diff < window)) if window else ok
        # Uncompiled, create_block_mask evaluates the mask over the dense (T, T) grid with int64
        # intermediates (~8*T*T bytes: 128 GB at 131k tokens); compiled, it never materialises it.
        long = device.type == "cuda" and T > 32768
        _block_masks[key] = create_block_mask(mask_mod, None, None, T, T, device=device,
                                              _compile=long)
    return _block_masks[key]


def flex_attention(q, k, v, window: Optional[int] = None):
    if q.device.type != "cuda" and torch.is_grad_enabled() and q.requires_grad:
        raise ValueError("backend='flex' on the CPU: FlexAttention has no CPU backward; use "
                         "backend 'auto' or 'eager' to train on the CPU")
    if q.device.type != "cuda" and not torch.is_grad_enabled():
        # A static query table slice is a view of a parameter and keeps requires_grad even under
        # no_grad, which the CPU FlexAttention path rejects; there is no backward here anyway.
        q, k, v = q.detach(), k.detach(), v.detach()
    block_mask = flex_block_mask(q.shape[2], window, q.device)
    gqa = q.shape[1] != k.shape[1]
    tiles = FLEX_FORWARD_TILES.get(q.shape[-1]) if q.device.type == "cuda" else None
    return _flex_fn(q.device)(q, k, v, block_mask=block_mask, enable_gqa=gqa,
                              kernel_options=dict(tiles) if tiles else None)


# One registry, one signature: fn(q, k, v, window) -> (B, H, T, D), causal from position 0.
ATTENTION_FUNCTIONS: dict[str, Callable] = {
    "sdpa": sdpa_attention,
    "flex": flex_attention,
    "flash": flash_attention,
    "eager": eager_attention,
}


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str,
           window: Optional[int] = None) -> torch.Tensor:
    """Causal attention of a whole sequence from position 0. q: (B, Hq, T, D); k, v: (B, Hkv, T,
    D), one head count dividing the other. Returns (B, max(Hq, Hkv), T, D)."""
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"attend: {q.shape[2]} queries over {k.shape[2]} keys; causal attention "
                         "from position 0 needs as many of each (use attend_cached for a cache)")
    if q.shape[1] < k.shape[1]:
        q = _broadcast_queries(q, k.shape[1])
    return ATTENTION_FUNCTIONS[backend](q, k, v, window)


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, *,
                  backend: str) -> torch.Tensor:
    """Queries (B, Hq, T, D) over a cache view k, v (B, Hkv, S, D) with the additive (T, S) mask
    of `cached_bias`. `eager` runs the reference math; every other backend the decode op below,
    which applies any window through the mask. `flash` too, as a fallback: FA4 aligns its causal
    mask to the last key, but a cache view runs past the positions written so far (the mask,
    built from the device position, hides them), and the decode op is what captured graphs
    replay."""
    if q.shape[1] < k.shape[1]:
        q = _broadcast_queries(q, k.shape[1])
    bias = bias.to(q.dtype)
    if backend == "eager":
        return _reference(q, k, v, bias)
    return decode_attention(q, k, v, bias)


def decode_attention(q, k, v, bias: torch.Tensor) -> torch.Tensor:
    """The decode step a captured graph replays. The G query heads sharing a K/V head are folded
    into the query-length dimension (query head i reads K/V head i // G, so a group is
    contiguous; its mask rows repeat), so SDPA runs without `enable_gqa` and with an additive
    mask, which the memory-efficient kernel accepts; with enable_gqa and a mask SDPA may fall
    back to the math kernel, which copies K/V once per query head."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    if group > 1 and T > 1:
        bias = bias.repeat(group, 1)
    y = F.scaled_dot_product_attention(q.reshape(B, Hkv, group * T, D), k, v, attn_mask=bias)
    return y.reshape(B, Hq, T, D)
