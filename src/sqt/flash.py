"""The `flash` attention backend: FlashAttention-4 (module `flash_attn.cute`, `pip install
"sqt[flash]"`), imported on first use and wrapped as two torch custom ops (forward, backward), so
that torch.compile sees one opaque op with a registered backward; and the checks that say why it
cannot run where it cannot."""

from __future__ import annotations

import importlib.util
import inspect
import math
from typing import Callable, NamedTuple, Optional

import torch

# FA4 ships kernels from SM80 up, but only Hopper (the H100, compute capability 9.0) was measured.
MIN_CAPABILITY = (9, 0)
# On SM90 FA4 takes head dims 8..256 in steps of 8 (rows of 16 bytes in a 2-byte dtype).
HEAD_DIM_STEP, HEAD_DIM_MAX = 8, 256
DTYPES = (torch.float16, torch.bfloat16)
# Head dims whose FA4 backward was compared with a reference on the H100 and found right. At 16 it
# is wrong (bench/results/probes/20261124-fa4: dq, dk, dv errors 0.48, 0.87, 0.40, against
# 0.002-0.005 at 64 and 128), so a backward is refused at every head dim not listed here until
# `python -m bench.gpu_check --parts flash` has checked it.
BACKWARD_CHECKED = (64, 128)
BACKWARD_WRONG = {16: "dq, dk, dv errors 0.48, 0.87, 0.40 against a reference"}


class Kernels(NamedTuple):
    """FA4's entry points in the (batch, seq, heads, head_dim) layout: forward(q, k, v, scale,
    window_left) -> (out, lse) and backward(dout, q, k, v, out, lse, scale, window_left) ->
    (dq, dk, dv); `window_left` -1 is no window. `source` names what they call. Tests install a
    pair computed by the reference math to check the wrapper on the CPU."""
    forward: Callable
    backward: Callable
    source: str


_kernels: Optional[Kernels] = None
_device_status_cache: dict[int, str] = {}

FWD_ARGS = ("q", "k", "v", "softmax_scale", "causal", "window_size_left", "window_size_right",
            "return_lse")
BWD_ARGS = ("q", "k", "v", "out", "dout", "lse", "softmax_scale", "causal", "window_size_left",
            "window_size_right")


def _takes(fn, names) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(n in params for n in names)


def _fa4_window(window_left: int) -> tuple:
    # sqt's window w (a query sees w keys: itself and w - 1 before) is FA4's (w - 1, 0).
    return (None, None) if window_left < 0 else (window_left, 0)


def load_fa4() -> Kernels:
    """FA4's forward and backward as sqt calls them. They are the functions FA4's own autograd
    Function calls (`_flash_attn_fwd`, `_flash_attn_bwd`); where this version of flash_attn.cute
    lacks them or their arguments, the public `flash_attn_func` is used instead, as one call that
    torch.compile does not trace (a graph break) and that computes its own backward."""
    from flash_attn.cute import interface as fa         # imports the CUTLASS DSL: seconds
    fwd, bwd = getattr(fa, "_flash_attn_fwd", None), getattr(fa, "_flash_attn_bwd", None)
    if _takes(fwd, FWD_ARGS) and _takes(bwd, BWD_ARGS):
        def forward(q, k, v, scale, window_left):
            left, right = _fa4_window(window_left)
            res = fwd(q, k, v, softmax_scale=scale, causal=True, window_size_left=left,
                      window_size_right=right, return_lse=True)
            return res[0], res[1]

        def backward(dout, q, k, v, out, lse, scale, window_left):
            left, right = _fa4_window(window_left)
            res = bwd(q=q, k=k, v=v, out=out, dout=dout, lse=lse, softmax_scale=scale,
                      causal=True, window_size_left=left, window_size_right=right)
            return res[0], res[1], res[2]
        return Kernels(forward, backward, "flash_attn.cute.interface._flash_attn_fwd/_bwd "
                                          "(torch custom op)")
    public = torch.compiler.disable(fa.flash_attn_func)

    def whole(q, k, v, scale, window_left):
        out = public(q, k, v, softmax_scale=scale, causal=True,
                     window_size=_fa4_window(window_left))
        return out[0] if isinstance(out, tuple) else out
    return Kernels(whole, None, "flash_attn.cute.flash_attn_func (a graph break under "
                                "torch.compile)")


def kernels() -> Kernels:
    global _kernels
    if _kernels is None:
        _kernels = load_fa4()
    return _kernels


def use_kernels(new: Optional[Kernels]) -> Optional[Kernels]:
    """Install a kernel pair (None: load FA4 on next use); returns the previous one."""
    global _kernels
    old, _kernels = _kernels, new
    return old


def _probe_device(index: int) -> str:
    try:
        installed = importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        return "flash-attn-4 is not installed (module flash_attn.cute; pip install \"sqt[flash]\")"
    capability = torch.cuda.get_device_capability(index)
    if capability < MIN_CAPABILITY:
        return (f"FlashAttention-4 needs compute capability >= {MIN_CAPABILITY[0]}."
                f"{MIN_CAPABILITY[1]} (Hopper or newer); {torch.cuda.get_device_name(index)} is "
                f"{capability[0]}.{capability[1]}")
    try:
        kernels()
    except Exception as e:                # a broken install: say what failed, once per device
        return f"flash_attn.cute failed to load ({type(e).__name__}: {str(e)[:200]})"
    return ""


@torch.compiler.assume_constant_result
def _device_status(index: int) -> str:
    """'' where FA4 can run on CUDA device `index`, else why not. Probed once per device; a
    compiled graph takes the answer as a constant instead of tracing the import."""
    if index not in _device_status_cache:
        _device_status_cache[index] = _probe_device(index)
    return _device_status_cache[index]


def head_dim_reason(head_dim: int, *, grad: bool = False) -> Optional[str]:
    """Why FA4 cannot run attention of this head dim (with a backward pass if `grad`), or None."""
    if head_dim % HEAD_DIM_STEP or not HEAD_DIM_STEP <= head_dim <= HEAD_DIM_MAX:
        return (f"head_dim={head_dim}: FlashAttention-4 takes head dims {HEAD_DIM_STEP}.."
                f"{HEAD_DIM_MAX} in steps of {HEAD_DIM_STEP}")
    if grad and head_dim not in BACKWARD_CHECKED:
        wrong = BACKWARD_WRONG.get(head_dim)
        return (f"head_dim={head_dim} with a backward pass: FlashAttention-4's backward "
                + (f"is wrong at this head dim ({wrong})" if wrong else
                   "was checked against the reference only at head dims "
                   + ", ".join(map(str, BACKWARD_CHECKED)))
                + "; train with backend 'sdpa' or 'auto' (a forward alone may use 'flash')")
    return None


def unavailable_reason(device, *, head_dim: Optional[int] = None,
                       grad: bool = False) -> Optional[str]:
    """Why the `flash` backend cannot run on `device` (for this head dim, with a backward pass if
    `grad`), or None where it can."""
    if head_dim is not None and head_dim_reason(head_dim):
        return head_dim_reason(head_dim)
    device = torch.device(device)
    if device.type != "cuda":
        return f"FlashAttention-4 runs on CUDA GPUs only, not on {device.type!r}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return (_device_status(index)
            or (head_dim_reason(head_dim, grad=grad) if head_dim is not None else None) or None)


def compute_dtype(q: torch.Tensor, k: torch.Tensor) -> torch.dtype:
    """The dtype FA4 runs in (it has fp16 and bf16 kernels only): the keys', which under autocast
    come out of the projection in autocast's dtype already, else autocast's for their device."""
    dtype = k.dtype
    if dtype not in DTYPES and torch.is_autocast_enabled(k.device.type):
        dtype = torch.get_autocast_dtype(k.device.type)
    if dtype not in DTYPES:
        raise ValueError(f"backend='flash' with {str(dtype).replace('torch.', '')} tensors: "
                         "FlashAttention-4 runs in float16 or bfloat16; use a bf16 autocast "
                         "(as the trainer does on CUDA) or a bf16 model")
    return dtype


# --- the custom ops: FA4 as one opaque op for torch.compile, with its backward registered -----

@torch.library.custom_op("sqt::flash_attn_fwd", mutates_args=())
def flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              window_left: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of causal attention; q (B, T, Hq, D), k and v (B, T, Hkv, D), any strides with
    the last one 1. Outputs are contiguous, as the fake below says: compiled code reads them by
    the fake's strides."""
    out, lse = kernels().forward(q, k, v, scale, window_left)
    return out.contiguous(), lse.contiguous()


@flash_fwd.register_fake
def _(q, k, v, scale, window_left):
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("sqt::flash_attn_bwd", mutates_args=())
def flash_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor, lse: torch.Tensor, scale: float,
              window_left: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = kernels().backward(dout, q, k, v, out, lse, scale, window_left)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@flash_bwd.register_fake
def _(dout, q, k, v, out, lse, scale, window_left):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save_for_backward(ctx, inputs, output):
    q, k, v, scale, window_left = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1])
    ctx.scale, ctx.window_left = scale, window_left


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.sqt.flash_attn_bwd(dout, q, k, v, out, lse, ctx.scale,
                                              ctx.window_left)
    return dq, dk, dv, None, None


flash_fwd.register_autograd(_backward, setup_context=_save_for_backward)


def flash_attention(q, k, v, window: Optional[int] = None):
    """The registry's `flash` entry: q (B, Hq, T, D), k and v (B, Hkv, T, D), Hkv dividing Hq.
    FA4's layout is (B, T, H, D); the model's q, k, v are transposed views of one fused
    projection, so the transposes here are free views back into it and the output, (B, T, H, D)
    in memory, is returned as the (B, H, T, D) view the registry promises."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    reason = unavailable_reason(q.device, head_dim=q.shape[-1], grad=grad)
    if reason:
        raise ValueError(f"backend='flash': {reason}")
    dtype = compute_dtype(q, k)
    q, k, v = (t.transpose(1, 2).to(dtype) for t in (q, k, v))
    scale, left = 1.0 / math.sqrt(q.shape[-1]), window - 1 if window else -1
    if kernels().backward is None:
        out = kernels().forward(q, k, v, scale, left)
    else:
        out = torch.ops.sqt.flash_attn_fwd(q, k, v, scale, left)[0]
    return out.transpose(1, 2)
