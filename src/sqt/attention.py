"""One attention layer: a query source (projection, static table, static rotary vector, or the
identity and frozen random controls), K/V projections, the head mapping and RoPE; the one KV cache
it reads and writes; and `attention_layer`, the same layer as a drop-in module for other models."""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LMConfig
from .kernels import attend, attend_cached, cached_bias, check_backend, resolve_backend
from .variants import LayerSpec, check_query_width


class Rotary(nn.Module):
    """Rotary position embedding, rotate-half convention, computed from the positions themselves
    so it has no length limit (and works for device positions inside a captured graph)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim}: RoPE needs an even head dimension")
        self.head_dim = head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos and sin of every (position, frequency) angle, (T, head_dim / 2), in `dtype`."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, D); positions: (T,) absolute positions. A new tensor."""
        return _rotated(x, *self.cos_sin(positions, x.dtype))

    def rotate_heads_(self, fused: torch.Tensor, spans, positions: torch.Tensor) -> torch.Tensor:
        """Rotate in place the column ranges `spans` [(start, stop), ...] of a (B, T, W)
        projection output, each read as heads of head_dim (the projected queries and the keys of
        the fused Q/K/V output); returns the buffer. Rotated where they lie, q, k and v stay views
        of one buffer, so nothing but that buffer is kept for the backward pass; rotated into new
        tensors, the buffer's q and k parts would stay allocated beside them, since v, a view,
        keeps the whole buffer alive."""
        cos, sin = (t[:, None] for t in self.cos_sin(positions, fused.dtype))  # (T, 1, D/2)
        hd = self.head_dim
        if torch.compiler.is_compiling():
            # A rotation copied into the buffer's views, which functionalisation and inductor
            # turn into one kernel writing the buffer: an autograd Function that mutates its
            # input is not something to hand a compiler (pytorch/pytorch#184113).
            for a, b in spans:
                heads = fused[..., a:b].unflatten(-1, (-1, hd))
                heads.copy_(_rotated(heads, cos, sin))
            return fused
        if torch.is_grad_enabled() and fused.requires_grad:
            return _RotateInPlace.apply(fused, cos, sin, tuple(spans), hd)
        _rotate_spans_(fused, cos, sin, spans, hd)
        return fused


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _rotate_spans_(fused, cos, sin, spans, head_dim: int) -> None:
    """The rotation of `_rotated`, written into the buffer with the same roundings (each product
    rounded, then the sum), one span at a time so that the temporaries stay within one span."""
    for a, b in spans:
        x1, x2 = fused[..., a:b].unflatten(-1, (-1, head_dim)).chunk(2, dim=-1)
        first = x1.clone()
        x1.mul_(cos).sub_(x2 * sin)
        x2.mul_(cos).add_(first * sin)


class _RotateInPlace(torch.autograd.Function):
    """RoPE in place on the fused projection output, for autograd outside torch.compile. The
    buffer comes fresh from the projection, which keeps its input, not its output, for the
    backward, so overwriting it loses nothing. The rotation is orthogonal: the gradient is the
    gradient rotated back (by -angle)."""

    @staticmethod
    def forward(ctx, fused, cos, sin, spans, head_dim):
        _rotate_spans_(fused, cos, sin, spans, head_dim)
        ctx.mark_dirty(fused)
        ctx.save_for_backward(cos, sin)
        ctx.spans, ctx.head_dim = spans, head_dim
        return fused

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        grad = grad.clone()        # the incoming gradient may be shared: never write into it
        _rotate_spans_(grad, cos.to(grad.dtype), -sin.to(grad.dtype), ctx.spans, ctx.head_dim)
        return grad, None, None, None, None


class KVCache:
    """Preallocated keys and values, one (batch, n_kv_heads, max_len, head_dim) buffer per layer.

    `pos`, a 0-dim int64 tensor on the cache's device, is the number of positions written so far
    and the only position there is: the model advances it in place and the attention op reads
    it, so a decode step never synchronises with the host and a CUDA graph can replay it. A
    caller that needs the count on the host (the decode engine, to choose a bucket) keeps its
    own. `view_len` is how many cached positions a decode step attends over; it must cover every
    position written, and the decode engine rounds it up to a bucket. Positions past `pos` are
    masked, never read, so `reset` does not clear them.

    `cfg` is a model's LMConfig (one buffer per layer) or one standalone `Attention` layer."""

    def __init__(self, cfg: Union[LMConfig, "Attention"], batch_size: int, max_len: int, *,
                 device=None, dtype: torch.dtype = torch.float32):
        if isinstance(cfg, Attention):
            specs, head_dim, limit = [cfg.spec], cfg.head_dim, cfg.max_positions
        elif isinstance(cfg, LMConfig):
            specs, head_dim, limit = cfg.layer_specs(), cfg.head_dim, cfg.max_positions
        else:
            raise ValueError(f"cfg={type(cfg).__name__}: expected an LMConfig or an Attention")
        for name, value in (("batch_size", batch_size), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCache {name}={value!r}: expected an integer >= 1")
        if limit is not None and max_len > limit:
            # Decode steps cannot check positions on the host, so the cache never holds more.
            raise ValueError(f"KVCache max_len={max_len} exceeds max_seq_len={limit}, the longest "
                             "sequence this model can read (learned positions or a static query "
                             "table)")
        self.max_len = max_len
        self.k = [torch.zeros(batch_size, s.n_kv_heads, max_len, head_dim, device=device,
                              dtype=dtype) for s in specs]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self._view_len = max_len

    @property
    def view_len(self) -> int:
        return self._view_len

    @view_len.setter
    def view_len(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.max_len:
            raise ValueError(f"view_len={value!r}: expected an integer in 1..{self.max_len}")
        self._view_len = value

    def reset(self) -> None:
        """Forget what was written: the next prefill starts at position 0."""
        self.pos.zero_()
        self.view_len = self.max_len

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Prefill: keys and values of positions 0 .. T-1."""
        T = k.shape[2]
        if T > self.max_len:
            raise ValueError(f"sequence length {T} exceeds the KV cache's max_len={self.max_len}; "
                             "allocate a larger cache")
        self.k[layer][:, :, :T] = k
        self.v[layer][:, :, :T] = v

    def write_at(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Decode: keys and values at device `positions`; returns the view a step attends over."""
        kc, vc = self.k[layer], self.v[layer]
        kc.index_copy_(2, positions, k.to(kc.dtype))
        vc.index_copy_(2, positions, v.to(vc.dtype))
        return kc[:, :, :self.view_len], vc[:, :, :self.view_len]

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Attention(nn.Module):
    """One attention layer. `forward(x)` is causal attention over x from position 0; with a
    KVCache it also stores the keys and values (`decode=False`, a prefill from position 0) or
    continues the cached sequence at `cache.pos` (`decode=True`). The layer reads `cache.pos` but
    never moves it: the cache's owner advances it once after every layer has run (TransformerLM
    does; a standalone caller sets it as the model does)."""

    def __init__(self, spec: LayerSpec, *, d_model: int, head_dim: int, max_seq_len: int,
                 rope: bool, rope_base: float = 10000.0, bias: bool = False,
                 backend: str = "auto", layer_idx: int = 0, query_seed: int = 0):
        super().__init__()
        d, hd = d_model, head_dim
        self.spec, self.layer_idx, self.head_dim = spec, layer_idx, hd
        self.max_seq_len = max_seq_len
        check_query_width(spec, d, hd, where=f"layer {layer_idx}: ")
        # A static query replaces W_q x. It is initialised at the scale a projected query has at
        # init (0.02-std weights times a unit-variance input of width d), so both start alike.
        q_std = 0.02 * math.sqrt(d)
        if spec.query == "table":
            self.q_table = nn.Parameter(torch.randn(max_seq_len, spec.n_q_heads, hd) * q_std)
        elif spec.query == "rotary":
            self.q_vec = nn.Parameter(torch.randn(spec.n_q_heads, hd) * q_std)
        elif spec.query == "random":
            # Frozen, so a buffer: no gradient, no optimizer state, but saved with the weights so
            # a loaded model computes the same function. Its own generator makes it a function of
            # (query_seed, layer) alone, whatever else was drawn before; 0.02 is W_q's init std.
            gen = torch.Generator().manual_seed(1_000_003 * query_seed + layer_idx)
            self.register_buffer("q_random", torch.randn(spec.n_q_heads * hd, d, generator=gen)
                                 * 0.02)
        # Everything computed from x (projected queries, keys, values) comes from one matmul: one
        # kernel instead of three, forward and backward, which is what bounds small models.
        q_width = spec.n_q_heads * hd if spec.query == "proj" else 0
        self.qkv_split = (q_width, spec.n_kv_heads * hd, spec.n_kv_heads * hd)
        self.qkv_proj = nn.Linear(d, sum(self.qkv_split), bias=bias)
        # Reverse SQA produces one output per K/V head, so o_proj is sized by the larger count.
        self.o_proj = nn.Linear(spec.n_attn_heads * hd, d, bias=bias)
        self.rotary = Rotary(hd, rope_base) if rope or spec.query == "rotary" else None
        # The columns of qkv_proj's output RoPE rotates where they lie: projected queries, keys.
        self.rope_spans = tuple((a, b) for a, b in ((0, q_width), (q_width, q_width
                                                    + self.qkv_split[1])) if b > a)
        self.requested_backend = backend
        check_backend(backend, spec.window, head_dim=hd)  # fail at construction where it can
        # Tools that read or replace the queries (the query probe, conversions) set this to a
        # function of (queries before RoPE (B, n_q_heads, T, head_dim), positions (T,)) that
        # returns the queries to use. The layer then takes the plain path, rotating into new
        # tensors, since the in-place rotation overwrites the projected queries it would show.
        self.query_hook: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None

    @classmethod
    def from_config(cls, cfg: LMConfig, spec: LayerSpec, layer_idx: int) -> "Attention":
        """Layer `layer_idx` of `TransformerLM(cfg)`: RoPE in the modern block, biases in the
        classic one."""
        return cls(spec, d_model=cfg.d_model, head_dim=cfg.head_dim, max_seq_len=cfg.max_seq_len,
                   rope=cfg.block == "modern", rope_base=cfg.rope_base,
                   bias=cfg.block == "classic", backend=cfg.backend, layer_idx=layer_idx,
                   query_seed=cfg.query_seed)

    @property
    def max_positions(self) -> Optional[int]:
        """The longest sequence this layer can read: its static table's length, else None."""
        return self.max_seq_len if self.spec.query == "table" else None

    def backend_for(self, device: torch.device, *, seq_len: Optional[int] = None,
                    grad: bool = False) -> str:
        """The attention op this layer runs on `device` for `seq_len` tokens, with a backward pass
        if `grad` (`auto` may choose by length: sqt.kernels.AUTO_FLASH)."""
        return resolve_backend(self.requested_backend, self.spec.window, device,
                               head_dim=self.head_dim, seq_len=seq_len, grad=grad)

    def queries(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None,
                projected: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, n_q_heads, T, head_dim) before RoPE, for tokens at `positions` (a device tensor;
        None: 0 .. T-1). For static sources x only sets the shape; `projected` is the query
        slice of `qkv_proj(x)` when the caller has it already (`forward` hands it over rotated,
        the rotation done in place)."""
        B, T, _ = x.shape
        nq, hd = self.spec.n_q_heads, self.head_dim
        if self.spec.query == "proj":
            if projected is None:
                projected = self.qkv_proj(x)[..., :self.qkv_split[0]]
            return projected.view(B, T, nq, hd).transpose(1, 2)
        if self.spec.query == "identity":
            return x[..., :nq * hd].reshape(B, T, nq, hd).transpose(1, 2)
        if self.spec.query == "random":
            return F.linear(x, self.q_random.to(x.dtype)).view(B, T, nq, hd).transpose(1, 2)
        if self.spec.query == "table":
            if positions is None:
                if T > self.max_seq_len:
                    raise ValueError(
                        f"sequence length {T} exceeds max_seq_len={self.max_seq_len}, the length "
                        f"of layer {self.layer_idx}'s static query table")
                q = self.q_table[:T]
            else:
                q = self.q_table.index_select(0, positions)
            return q.permute(1, 0, 2).unsqueeze(0).expand(B, nq, T, hd).to(x.dtype)
        return self.q_vec[None, :, None, :].expand(B, nq, T, hd).to(x.dtype)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, *, decode: bool = False,
                positions: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, T, d_model) -> (B, T, d_model). With `decode`, `positions` (T,) and the
        `cached_bias` mask are what a model builds once per forward for all its layers; left
        out, they are built here from `cache.pos` and `cache.view_len`."""
        B, T, _ = x.shape
        nkv, hd = self.spec.n_kv_heads, self.head_dim
        if decode:
            if cache is None:
                raise ValueError("decode=True needs the KVCache the sequence continues")
            if positions is None:
                positions = cache.pos + torch.arange(T, device=x.device)
        qkv = self.qkv_proj(x)
        at = positions if decode else torch.arange(T, device=x.device)
        if self.query_hook is not None:
            q_lin, k, v = qkv.split(self.qkv_split, dim=-1)
            q = self.query_hook(self.queries(x, positions if decode else None, q_lin), at)
            k = k.view(B, T, nkv, hd).transpose(1, 2)
            if self.rotary is not None:
                q, k = self.rotary(q, at), self.rotary(k, at)
        else:
            if self.rotary is not None:
                qkv = self.rotary.rotate_heads_(qkv, self.rope_spans, at)
            q_lin, k, v = qkv.split(self.qkv_split, dim=-1)
            q = self.queries(x, positions if decode else None, q_lin)
            if self.rotary is not None and self.spec.query != "proj":
                q = self.rotary(q, at)
            k = k.view(B, T, nkv, hd).transpose(1, 2)
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        grad = torch.is_grad_enabled() and (x.requires_grad or qkv.requires_grad)
        backend = self.backend_for(x.device, seq_len=T, grad=grad)
        if decode:
            k, v = cache.write_at(self.layer_idx, positions, k, v)
            if bias is None:
                bias = cached_bias(positions, cache.view_len, self.spec.window, dtype=q.dtype)
            y = attend_cached(q, k, v, bias, backend=backend)
        else:
            if cache is not None:
                cache.write(self.layer_idx, k, v)
            y = attend(q, k, v, backend=backend, window=self.spec.window)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the projections were fused hold q_proj/k_proj/v_proj; they
        # load as the concatenation, which computes exactly the same function.
        old = [prefix + n + "_proj." for n in ("q", "k", "v")]
        if old[1] + "weight" in state_dict and prefix + "qkv_proj.weight" not in state_dict:
            for kind in ("weight", "bias"):
                parts = [state_dict.pop(o + kind) for o in old if o + kind in state_dict]
                if parts:
                    state_dict[prefix + "qkv_proj." + kind] = torch.cat(parts, dim=0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def attention_layer(*, d_model: int, n_heads: int, variant: Union[str, LayerSpec] = "mha",
                    rope: bool = True, max_seq_len: int = 4096, backend: str = "auto",
                    rope_base: float = 10000.0, bias: bool = False) -> Attention:
    """sqt's attention layer as a drop-in module for another model: (B, T, d_model) in, causal
    attention from position 0, (B, T, d_model) out, exactly the `Attention` TransformerLM uses.

    `variant` is anything `sqt.parse_layer` accepts for a model of `n_heads` heads (head_dim =
    d_model // n_heads): a name (`mha`, `gqa`, `sqa`, `xsqa`, `sqt`, ...), `nq/nkv`, either
    prefixed by a query source (`table:sqa`, `rotary:gqa`) and suffixed by a sliding window
    (`sqa@128`). `rope` rotates queries and keys (a `rotary:` query is always rotated);
    `max_seq_len` is the length of a static query table (other variants ignore it); `bias` adds
    biases to the projections. Weights keep PyTorch's default initialisation. For cached
    decoding, build `KVCache(layer, batch_size, max_len)`."""
    for name, value in (("rope", rope), ("bias", bias)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: expected True or False")
    layers = variant.name if isinstance(variant, LayerSpec) else variant
    if not isinstance(layers, str):
        raise ValueError(f"variant={variant!r}: expected a variant string or a LayerSpec")
    # An LMConfig of one layer validates every field with the library's usual messages.
    cfg = LMConfig(d_model=d_model, n_heads=n_heads, n_layers=1, max_seq_len=max_seq_len,
                   backend=backend, rope_base=rope_base, layers=layers)
    return Attention(cfg.layer_specs()[0], d_model=d_model, head_dim=cfg.head_dim,
                     max_seq_len=max_seq_len, rope=rope, rope_base=rope_base, bias=bias,
                     backend=backend)
