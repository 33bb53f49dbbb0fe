"""Where an sqt attention layer's heads sit in a Hugging Face (Llama-style) attention layer of a
shape HF accepts — dead query heads, duplicated rows — and the way back. Tensor bookkeeping only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .variants import LayerSpec


class NotRestorable(ValueError):
    """HF weights that no longer have the structure a padded export wrote (e.g. after fine-tuning
    in HF brought a dead head to life)."""


@dataclass(frozen=True)
class HeadPlan:
    """An HF layer of `n_q` query and `n_kv` K/V heads holding one sqt layer. Per HF query head:
    the sqt query head whose rows it holds (`q_src`) and the sqt attention head whose o_proj
    columns it holds (`o_src`), None for a dead head. Per HF K/V head: the sqt K/V head it copies
    (`kv_src`), None where no live query head reads it."""

    n_q: int
    n_kv: int
    q_src: tuple
    o_src: tuple
    kv_src: tuple

    @property
    def is_identity(self) -> bool:
        return (self.q_src == self.o_src == tuple(range(self.n_q))
                and self.kv_src == tuple(range(self.n_kv)))


def _smallest_width(at_least: int, step: int, d_model: int, what: str) -> int:
    # LlamaConfig checks hidden_size % num_attention_heads even when head_dim is explicit.
    for n in range(step * -(-at_least // step), d_model + 1, step):
        if d_model % n == 0:
            return n
    raise ValueError(f"{what}: no query head count >= {at_least} that is a multiple of {step} "
                     f"divides d_model={d_model}, which Hugging Face's config requires")


def natural_shape(spec: LayerSpec, d_model: int) -> tuple[int, int]:
    """The fewest HF heads that hold `spec`: its own counts when HF accepts them (query heads a
    multiple of the K/V heads and a divisor of d_model), else the same K/V heads with each group of
    query heads widened (reverse SQA: one query row per K/V head)."""
    return _smallest_width(spec.n_attn_heads, spec.n_kv_heads, d_model,
                           f"layer {spec.name}"), spec.n_kv_heads


def mha_width(specs, d_model: int) -> int:
    """One MHA-shaped head count that holds every layer of a mix."""
    return _smallest_width(max(s.n_attn_heads for s in specs), 1, d_model, "the layer mix")


def plan(spec: LayerSpec, n_q: int, n_kv: int) -> HeadPlan:
    """Place sqt attention head a (which reads query head a*nq//n_attn and K/V head a//G) in an HF
    layer of shape (n_q, n_kv): in the same K/V group when K/V heads are kept, at index a with
    its K/V head copied when the layer is written MHA-shaped."""
    n_attn, group = spec.n_attn_heads, spec.n_attn_heads // spec.n_kv_heads
    if n_kv == spec.n_kv_heads and n_q % n_kv == 0 and n_q // n_kv >= group:
        wide = n_q // n_kv
        slot = [(a // group) * wide + a % group for a in range(n_attn)]
        kv_src = list(range(n_kv))
    elif n_q == n_kv >= n_attn:
        slot = list(range(n_attn))
        kv_src = [a // group for a in range(n_attn)] + [None] * (n_kv - n_attn)
    else:
        raise ValueError(f"layer {spec.name} does not fit an HF layer of {n_q} query and {n_kv} "
                         "K/V heads")
    q_src, o_src = [None] * n_q, [None] * n_q
    for a, p in enumerate(slot):
        q_src[p], o_src[p] = a * spec.n_q_heads // n_attn, a
    return HeadPlan(n_q, n_kv, tuple(q_src), tuple(o_src), tuple(kv_src))


def _pick(heads: torch.Tensor, src) -> torch.Tensor:
    """Rows of per-head tensor `heads` (n, ...) in the order `src`, zeros where src is None."""
    zero = torch.zeros_like(heads[0])
    return torch.stack([heads[i] if i is not None else zero for i in src])


def pad(p: HeadPlan, *, q: Optional[torch.Tensor], k: torch.Tensor, v: torch.Tensor,
        o: torch.Tensor) -> dict:
    """sqt per-head tensors -> HF per-head tensors. q: (n_q_heads, head_dim, ...) rows or vector
    (None: no query weights), k/v: (n_kv_heads, head_dim, d), o: (n_attn_heads, d, head_dim)
    (o_proj's columns, grouped by head)."""
    return {"q": None if q is None else _pick(q, p.q_src), "k": _pick(k, p.kv_src),
            "v": _pick(v, p.kv_src), "o": _pick(o, p.o_src)}


def _take(heads: torch.Tensor, src, count: int, what: str) -> torch.Tensor:
    """Inverse of `_pick`: sqt head i is the first HF head whose source is i; every other copy
    must equal it, or the HF layer no longer has the structure the export gave it."""
    out = []
    for i in range(count):
        rows = [heads[j] for j, s in enumerate(src) if s == i]
        if not rows:
            raise NotRestorable(f"{what}: no HF head holds sqt head {i}")
        if any(not torch.equal(r, rows[0]) for r in rows[1:]):
            raise NotRestorable(f"{what}: the copies of sqt head {i} differ")
        out.append(rows[0])
    return torch.stack(out)


def unpad(p: HeadPlan, spec: LayerSpec, *, q: Optional[torch.Tensor], k: torch.Tensor,
          v: torch.Tensor, o: torch.Tensor) -> dict:
    """HF per-head tensors -> sqt per-head tensors (the inverse of `pad`). Raises NotRestorable
    when a dead head writes to the output or copies disagree."""
    dead = [j for j, s in enumerate(p.o_src) if s is None]
    if any(o[j].any() for j in dead):
        raise NotRestorable(f"layer {spec.name}: a padded (dead) query head has nonzero o_proj "
                            "columns")
    return {"q": None if q is None else _take(q, p.q_src, spec.n_q_heads, "query rows"),
            "k": _take(k, p.kv_src, spec.n_kv_heads, "key rows"),
            "v": _take(v, p.kv_src, spec.n_kv_heads, "value rows"),
            "o": _take(o, p.o_src, spec.n_attn_heads, "o_proj columns")}
