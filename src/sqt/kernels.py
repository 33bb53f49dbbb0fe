"""The attention op alone, behind one signature: `sdpa` (default), `flex` (sliding windows) and
`eager` (the reference the tests compare against). Queries live at absolute positions
`q_offset .. q_offset+T-1`, keys at `0 .. S-1`; a query sees keys at or before its own position
(and, with a window w, fewer than w positions back)."""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

Offset = Union[int, torch.Tensor]


def resolve_backend(requested: str, window: Optional[int], device_type: str = "cuda") -> str:
    """The backend a layer will actually use on a device. `auto` picks sdpa for full causal layers
    and, for windowed ones, flex on CUDA and eager elsewhere (FlexAttention has no CPU backward).
    Never falls back silently: a window on a backend that cannot apply one is an error."""
    if requested == "auto":
        return ("flex" if device_type == "cuda" else "eager") if window else "sdpa"
    if requested == "sdpa" and window:
        raise ValueError(
            f"backend='sdpa' with window={window}: SDPA has no sliding-window kernel; "
            "use backend 'flex', 'eager' or 'auto' for windowed layers")
    if requested not in ATTENTION_FUNCTIONS:
        raise ValueError(f"backend={requested!r}: expected one of auto, "
                         f"{', '.join(ATTENTION_FUNCTIONS)}")
    return requested


def allowed_mask(T: int, S: int, q_offset: Offset, window: Optional[int],
                 device) -> torch.Tensor:
    """Boolean (T, S): True where query i (at position q_offset + i) may attend to key j."""
    q_pos = torch.arange(T, device=device) + q_offset
    k_pos = torch.arange(S, device=device)
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = diff >= 0
    if window:
        allowed = allowed & (diff < window)
    return allowed


def _broadcast_queries(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Reverse SQA: fewer query heads than K/V heads. Query head h serves K/V heads
    h*G .. h*G+G-1, so queries are repeated (they are the small side) and K/V stay as they are."""
    return q.repeat_interleave(n_kv // q.shape[1], dim=1)


def _is_plain_causal(T: int, S: int, q_offset: Offset) -> bool:
    return isinstance(q_offset, int) and q_offset == 0 and T == S


def _is_last_row(T: int, S: int, q_offset: Offset) -> bool:
    # One query at the newest position sees every key: no mask needed.
    return isinstance(q_offset, int) and T == 1 and q_offset == S - 1


def sdpa_attention(q, k, v, q_offset: Offset = 0, window: Optional[int] = None):
    if window:
        raise ValueError(f"window={window}: the sdpa backend cannot apply a sliding window")
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if _is_plain_causal(T, S, q_offset):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if _is_last_row(T, S, q_offset):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    mask = allowed_mask(T, S, q_offset, None, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def eager_attention(q, k, v, q_offset: Offset = 0, window: Optional[int] = None):
    T, S = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(~allowed_mask(T, S, q_offset, window, q.device), float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


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


def flex_block_mask(T: int, S: int, q_offset: int, window: Optional[int], device):
    """Block-sparse mask for causal (+ window) attention; fully masked tiles are skipped. Built
    once per shape and cached (building is set-up, not attention)."""
    from torch.nn.attention.flex_attention import create_block_mask
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (T, S, q_offset, window, str(device))
    if key not in _block_masks:
        def mask_mod(b, h, q_idx, kv_idx):
            diff = q_idx + q_offset - kv_idx
            ok = diff >= 0
            return (ok & (diff < window)) if window else ok
        # Uncompiled, create_block_mask evaluates the mask over the dense (T, S) grid with int64
        # intermediates (~8*T*S bytes: 128 GB at 131k tokens); compiled, it never materialises it.
        long = device.type == "cuda" and T * S > 32768 * 32768
        _block_masks[key] = create_block_mask(mask_mod, None, None, T, S, device=device,
                                              _compile=long)
    return _block_masks[key]


def flex_attention(q, k, v, q_offset: Offset = 0, window: Optional[int] = None):
    if not isinstance(q_offset, int):
        raise ValueError("flex backend: q_offset must be a Python int (the block mask is built "
                         "per offset); use the sdpa or eager backend for tensor offsets")
    if q.device.type != "cuda" and torch.is_grad_enabled() and q.requires_grad:
        raise ValueError("backend='flex' on the CPU: FlexAttention has no CPU backward; use "
                         "backend 'auto' or 'eager' to train on the CPU")
    if q.device.type != "cuda" and not torch.is_grad_enabled():
        # A static query table slice is a view of a parameter and keeps requires_grad even under
        # no_grad, which the CPU FlexAttention path rejects; there is no backward here anyway.
        q, k, v = q.detach(), k.detach(), v.detach()
    T, S = q.shape[2], k.shape[2]
    block_mask = flex_block_mask(T, S, q_offset, window, q.device)
    gqa = q.shape[1] != k.shape[1]
    tiles = FLEX_FORWARD_TILES.get(q.shape[-1]) if q.device.type == "cuda" else None
    return _flex_fn(q.device)(q, k, v, block_mask=block_mask, enable_gqa=gqa,
                              kernel_options=dict(tiles) if tiles else None)


def decode_attention(q, k, v, q_offset: torch.Tensor, window: Optional[int] = None):
    """One new query per sequence (T == 1) at a position held in a device tensor, over a
    preallocated cache that may be longer than the sequence so far: the decode step a captured
    graph replays. The query heads sharing a K/V head are folded into the query-length dimension
    (their position, hence their mask row, is the same), so SDPA runs without `enable_gqa` and
    with an additive mask, which the memory-efficient kernel accepts; with enable_gqa and a mask
    SDPA may fall back to the math kernel, which copies K/V once per query head."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    bias = _decode_bias(S, q_offset, window, q.dtype, q.device)
    y = F.scaled_dot_product_attention(q.reshape(B, Hkv, (Hq // Hkv) * T, D), k, v,
                                       attn_mask=bias)
    return y.reshape(B, Hq, T, D)


_decode_bias_memo: dict = {}


def _decode_bias(S: int, q_offset: torch.Tensor, window: Optional[int], dtype, device):
    """The (1, 1, 1, S) additive mask of a decode step, built once per step rather than once per
    layer (for a small model the mask's tiny kernels would be a fifth of the step). The memo is
    keyed on the offset tensor's identity and version counter, which every in-place update of
    the position bumps, so a stale mask is never reused."""
    if torch.compiler.is_compiling():
        # Traced once into a compiled step, where the mask is fused; no memo to consult.
        allowed = allowed_mask(1, S, q_offset, window, device)
        return torch.zeros(1, 1, 1, S, dtype=dtype, device=device).masked_fill(
            ~allowed.view(1, 1, 1, S), float("-inf"))
    version = getattr(q_offset, "_version", None) if not q_offset.is_inference() else None
    key = (S, window, dtype, str(device))
    if version is not None and _decode_bias_memo.get("offset") is q_offset \
            and _decode_bias_memo.get("version") == version and key in _decode_bias_memo:
        return _decode_bias_memo[key]
    allowed = allowed_mask(1, S, q_offset, window, device)
    bias = torch.zeros(1, 1, 1, S, dtype=dtype, device=device).masked_fill_(
        ~allowed.view(1, 1, 1, S), float("-inf"))
    if version is not None:
        if _decode_bias_memo.get("offset") is not q_offset \
                or _decode_bias_memo.get("version") != version:
            _decode_bias_memo.clear()
            _decode_bias_memo.update(offset=q_offset, version=version)
        _decode_bias_memo[key] = bias
    return bias


# One registry, one signature: fn(q, k, v, q_offset, window) -> (B, H, T, D).
ATTENTION_FUNCTIONS: dict[str, Callable] = {
    "sdpa": sdpa_attention,
    "flex": flex_attention,
    "eager": eager_attention,
}


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
           q_offset: Offset = 0, window: Optional[int] = None) -> torch.Tensor:
    """q: (B, Hq, T, D); k, v: (B, Hkv, S, D), one head count dividing the other. Returns
    (B, max(Hq, Hkv), T, D)."""
    if q.shape[1] < k.shape[1]:
        q = _broadcast_queries(q, k.shape[1])
    if not isinstance(q_offset, int) and q.shape[2] == 1 and backend != "eager":
        # The decode step of a graph-captured engine (the eager backend stays the reference).
        return decode_attention(q, k, v, q_offset, window)
    return ATTENTION_FUNCTIONS[backend](q, k, v, q_offset, window)
