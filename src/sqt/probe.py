"""The query probe: for every layer and head of a trained model, the share of the query's variance
that position alone explains (keys beside it as a contrast), and the validation loss the model
loses when a layer's queries are replaced by their per-position mean. `sqt probe RUN` writes it.

Definitions (what `query_probe` measures, on N windows of T tokens, every window at positions
0 .. T-1):

- q is the query a layer's source produces *before RoPE*: W_q x for a projected query (x the
  normalised layer input), x's own features for `identity`, the frozen matrix times x for
  `random`, the table row Q[t] for `table`. A static rotary query is one constant vector before
  RoPE, so for `rotary` q is that vector rotated to position t. k is the key before RoPE.
- The positional share of a head is Var_t(E[q | t]) / Var(q), each summed over the head's
  dimensions, positions weighted alike: the between-position variance over the total. Both parts
  are estimated without the plug-in bias (a one-way ANOVA): the spread of the N-sample means
  alone would credit position with about 1/N of any variance. The unbiased between-position
  estimate can come out slightly negative where the truth is ~0; it is clamped at 0, the bound of
  the quantity it estimates, so the share lies in [0, 1]. A head whose query does not vary at all
  counts as positional (share 1): a constant is a function of position, and replacing it by its
  positional mean changes nothing. A static table row has no within-position variance: share 1.
- The layer's share pools its heads: summed between-position variance over summed total.
- The rotated share is the same for the query after RoPE (the query the attention op scores with;
  equal to the share where the layer has no RoPE). Before RoPE, a RoPE model's queries carry
  almost no position (position enters through the rotation), so their share is ~0; a mean query
  that RoPE rotates is positional afterwards. A static table replaces the query before RoPE.
- Δ loss of a layer: the mean next-token loss (nats/token) on the windows with that layer's
  queries replaced by their per-position mean over the same windows, minus the unchanged model's;
  one layer at a time, no retraining. That replacement is exactly the layer converted to a static
  table (`sqt.convert`), so a layer with a large positional share and a small Δ is one that
  tolerates a static query.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

DEFINITIONS = {
    "q": "the query before RoPE (rotary source: its vector rotated to position t)",
    "k": "the key before RoPE",
    "share": "Var_t(E[v | t]) / Var(v), summed over the head's dimensions, positions weighted "
             "alike; unbiased one-way ANOVA estimate, between part clamped at 0",
    "layer_share": "the heads' between-position variances summed over their total variances",
    "q_share_rotated": "the share of the query after RoPE, the one attention scores with (the "
                       "same as q_share in a layer without RoPE)",
    "delta_loss": "mean next-token loss (nats/token) with the layer's queries replaced by their "
                  "per-position mean over the probe text, minus the unchanged model's",
    "share_delta_spearman": "rank correlation over layers of the query's layer share and its "
                            "delta_loss: negative where positional layers tolerate the swap",
}


class PositionMoments:
    """Per-position sums of one layer's per-head vectors (float64), from which the positional
    mean and the between/within-position variance of each head follow."""

    def __init__(self):
        self.s1 = self.s2 = None     # (T, H, D) sums, (T, H) sums of squared norms
        self.n = 0                   # windows seen

    def add(self, v: torch.Tensor) -> None:
        """v: (B, H, T, D), one vector per window, head and position."""
        v = v.detach().to(torch.float64)
        s1, s2 = v.sum(0).transpose(0, 1), v.square().sum((0, 3)).transpose(0, 1)
        if self.s1 is None:
            self.s1, self.s2 = s1, s2
        else:
            self.s1 += s1
            self.s2 += s2
        self.n += v.shape[0]

    def mean(self) -> torch.Tensor:
        """(T, H, D): the mean vector at each position."""
        return self.s1 / self.n

    def variances(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(between, within) per head, (H,) each: unbiased estimates of Var_t(E[v | t]) and
        E_t[Var(v | t)], summed over dimensions. Needs at least 2 windows and 2 positions."""
        N, T = self.n, self.s1.shape[0]
        if N < 2 or T < 2:
            raise ValueError(f"the probe has {N} windows of {T} positions: expected at least 2 "
                             "of each to separate position from content")
        mu = self.mean()
        # Σ_n ||v - μ_t||² per position; rounding can take an exact 0 (a table row) below 0.
        ssw = (self.s2 - N * mu.square().sum(-1)).clamp_min(0).sum(0)
        within = ssw / (T * (N - 1))
        spread = (mu - mu.mean(0)).square().sum((0, 2))          # Σ_t ||μ_t - μ||²
        between = ((spread - (T - 1) * within / N) / T).clamp_min(0)
        return between, within


def shares(between: torch.Tensor, within: torch.Tensor) -> list[float]:
    """Per head: between / (between + within), 1 where the vector does not vary at all."""
    total = between + within
    return [1.0 if t <= 0 else float(b / t) for b, t in zip(between.tolist(), total.tolist())]


def pooled_share(between: torch.Tensor, within: torch.Tensor) -> float:
    total = float((between + within).sum())
    return 1.0 if total <= 0 else float(between.sum()) / total


@contextlib.contextmanager
def recording(model):
    """Record every layer's queries and keys (before RoPE) while the block runs: yields the
    per-layer (query, key, rotated query) PositionMoments; the last is None in a layer without
    RoPE, where the rotated query is the query."""
    moments = [(PositionMoments(), PositionMoments(),
                PositionMoments() if b.attn.rotary is not None and b.attn.spec.query != "rotary"
                else None) for b in model.blocks]
    handles, patched = [], []
    for block, (qm, km, rm) in zip(model.blocks, moments):
        attn = block.attn

        def record(q, positions, *, attn=attn, qm=qm, rm=rm):
            # A rotary query is constant before RoPE: it is recorded where it acts.
            qm.add(attn.rotary(q, positions) if attn.spec.query == "rotary" else q)
            if rm is not None:
                rm.add(attn.rotary(q, positions))
            return q

        def keys(module, inputs, out, *, attn=attn, km=km):
            q_w, kv_w, _ = attn.qkv_split
            B, T, _ = out.shape
            km.add(out[..., q_w:q_w + kv_w].reshape(B, T, -1, attn.head_dim).transpose(1, 2))

        attn.query_hook = record
        patched.append(attn)
        handles.append(attn.qkv_proj.register_forward_hook(keys))
    try:
        yield moments
    finally:
        for attn in patched:
            attn.query_hook = None
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replaced_queries(attn, mean: torch.Tensor, heads: Optional[Sequence[int]] = None):
    """Within the block, `attn`'s queries (before RoPE) are `mean` (T, n_q_heads, head_dim) at
    each position, for every head or only `heads`: the layer as a static table."""
    def queries(q, positions):
        m = mean.index_select(0, positions).permute(1, 0, 2).to(q.dtype)
        if heads is None:
            return m.unsqueeze(0).expand_as(q)
        q = q.clone()
        q[:, list(heads)] = m[list(heads)]
        return q

    attn.query_hook = queries
    try:
        yield
    finally:
        attn.query_hook = None


def _device(model) -> torch.device:
    return next(model.parameters()).device


def check_windows(model, token_windows: torch.Tensor) -> torch.Tensor:
    if not isinstance(token_windows, torch.Tensor) or token_windows.dim() != 2 \
            or token_windows.shape[1] < 3 or token_windows.dtype not in (torch.long, torch.int):
        raise ValueError("token_windows: expected an integer tensor (windows, seq_len + 1) with "
                         "seq_len >= 2 (inputs are [:, :-1], targets [:, 1:])")
    limit, vocab = model.max_positions, model.config.vocab_size
    if limit is not None and token_windows.shape[1] - 1 > limit:
        raise ValueError(f"token_windows of {token_windows.shape[1] - 1} tokens: the model reads "
                         f"at most {limit}")
    if int(token_windows.max()) >= vocab or int(token_windows.min()) < 0:
        raise ValueError(f"token_windows hold ids outside 0..{vocab - 1}, the model's vocabulary:"
                         " the text was tokenized for another model")
    return token_windows.long()


@torch.inference_mode()
def mean_loss(model, token_windows: torch.Tensor, *, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) over the windows, in eval mode."""
    if not isinstance(token_windows, torch.Tensor):
        raise ValueError(f"token_windows is a {type(token_windows).__name__}: expected an "
                         "integer tensor (windows, seq_len + 1)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected an integer >= 1")
    device, total, was = _device(model), 0.0, model.training
    model.eval()
    for w in token_windows.split(batch_size):
        w = w.to(device)
        logits = model(w[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(),
                                 reduction="sum").item()
    model.train(was)
    return total / (token_windows.shape[0] * (token_windows.shape[1] - 1))


def _record(model, token_windows, batch_size):
    with recording(model) as moments:
        loss = mean_loss(model, token_windows, batch_size=batch_size)
    return loss, moments


def _query_mean(attn, qm: PositionMoments) -> torch.Tensor:
    """(T, n_q_heads, head_dim): the mean query before RoPE at each position (a rotary query's
    moments are recorded after RoPE; before it, the query is its vector)."""
    if attn.spec.query == "rotary":
        return attn.q_vec.detach().float().unsqueeze(0).expand(qm.s1.shape[0], -1, -1)
    return qm.mean().float()


def positional_means(model, token_windows: torch.Tensor, *,
                     batch_size: int = 16) -> list[torch.Tensor]:
    """Per layer, the mean query (before RoPE) at each position over the windows: (T, n_q_heads,
    head_dim) float32 on the model's device. What a static table converted from the layer holds."""
    model.eval()
    _, moments = _record(model, check_windows(model, token_windows), batch_size)
    return [_query_mean(b.attn, qm) for b, (qm, _, _) in zip(model.blocks, moments)]


def query_probe(model, token_windows: torch.Tensor, *, batch_size: int = 16,
                ablate: bool = True, per_head: bool = False) -> dict:
    """The probe of `model` on `token_windows` ((N, T + 1) token ids, e.g. validation text):
    per layer and head the positional share of the query and of the key, and per layer (with
    `per_head`, also per head) the Δ loss of replacing its queries by their positional mean
    (`ablate=False`: shares only, one forward pass). See the module's docstring for the
    definitions; the result is JSON-ready."""
    model.eval()
    token_windows = check_windows(model, token_windows)
    base, moments = _record(model, token_windows, batch_size)
    layers = []
    for i, (block, (qm, km, rm)) in enumerate(zip(model.blocks, moments)):
        attn, mean = block.attn, _query_mean(block.attn, qm)
        qb, qw = qm.variances()
        kb, kw = km.variances()
        rb, rw = rm.variances() if rm is not None else (qb, qw)

        def delta(heads=None):
            with replaced_queries(attn, mean, heads):
                return mean_loss(model, token_windows, batch_size=batch_size) - base

        layers.append({
            "layer": i, "spec": attn.spec.name, "query": attn.spec.query,
            "q_share": shares(qb, qw), "k_share": shares(kb, kw),
            "q_share_layer": pooled_share(qb, qw), "k_share_layer": pooled_share(kb, kw),
            "q_share_rotated": shares(rb, rw), "q_share_rotated_layer": pooled_share(rb, rw),
            "q_variance": float((qb + qw).sum()), "delta_loss": delta() if ablate else None,
            "delta_loss_heads": ([delta([h]) for h in range(attn.spec.n_q_heads)]
                                 if per_head and ablate else None)})
    N, T = token_windows.shape[0], token_windows.shape[1] - 1
    return {"definitions": DEFINITIONS, "windows": N, "seq_len": T, "tokens": N * T,
            "base_loss": base, "layers": layers,
            "share_delta_spearman": spearman([r["q_share_layer"] for r in layers],
                                             [r["delta_loss"] for r in layers]) if ablate else None}


def layers_by_share(report: dict) -> list[int]:
    """Layer indices, the most positional query first (ties: the lower layer first)."""
    return sorted(range(len(report["layers"])),
                  key=lambda i: (-report["layers"][i]["q_share_layer"], i))


def heads_by_content(report: dict, layer: int) -> list[int]:
    """A layer's query heads, the most content-dependent (lowest positional share) first."""
    s = report["layers"][layer]["q_share"]
    return sorted(range(len(s)), key=lambda h: (s[h], h))


def spearman(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Rank correlation (average ranks for ties); None with fewer than 3 points or no spread."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    if len(xs) < 3:
        return None
    a, b = ranks(list(xs)), ranks(list(ys))
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    sa = math.sqrt(sum((x - ma) ** 2 for x in a))
    sb = math.sqrt(sum((y - mb) ** 2 for y in b))
    return None if sa == 0 or sb == 0 else cov / (sa * sb)
