"""The one home of the FLOP formulas: attention per layer, and the whole model per step, so that
achieved TFLOP/s and model FLOP utilisation mean the same thing in every benchmark."""

from __future__ import annotations

from .config import LayerSpec, LMConfig, feed_forward_params


def attention_flops(spec: LayerSpec, head_dim: int, batch: int, q_len: int,
                    kv_len: int | None = None, causal: bool = True) -> float:
    """Forward FLOPs of the two attention matmuls (Q K^T and P V) of one layer. The op runs
    max(n_q, n_kv) heads: fewer query heads is exactly what SQA removes. Causal attention (and a
    window) counts only the query/key pairs that are computed, as FlashAttention's benchmarks do."""
    kv_len = q_len if kv_len is None else kv_len
    heads = spec.n_attn_heads
    if causal:
        offset = kv_len - q_len  # queries sit at the end of the keys (prefill or decode)
        pairs = sum_visible_keys(q_len, offset, spec.window)
    else:
        pairs = q_len * kv_len
    return 4.0 * batch * heads * head_dim * pairs


def sum_visible_keys(q_len: int, offset: int, window: int | None) -> float:
    """Number of (query, key) pairs a causal (windowed) mask lets through, queries at positions
    offset .. offset+q_len-1."""
    first, last = offset + 1, offset + q_len          # keys visible to the first / last query
    full = (first + last) * q_len / 2
    if not window:
        return full
    # Each query sees min(position + 1, window) keys.
    capped_from = max(window - 1, offset)             # positions from here on see `window` keys
    n_capped = max(0, offset + q_len - capped_from)
    uncapped = q_len - n_capped
    return (first + first + uncapped - 1) * uncapped / 2 + n_capped * window if uncapped else \
        q_len * window


def linear_flops_per_token(cfg: LMConfig) -> float:
    """Forward FLOPs per token of every matmul with weights (projections, MLP or the router and
    the top_k experts a token is sent to, LM head)."""
    d, hd = cfg.d_model, cfg.head_dim
    total = 0.0
    for spec in cfg.layer_specs():
        q = d * spec.n_q_heads * hd if spec.query == "proj" else 0
        kv = 2 * d * spec.n_kv_heads * hd
        o = spec.n_attn_heads * hd * d
        mlp = (feed_forward_params(cfg, active=True) if cfg.n_experts else
               (3 if cfg.block == "modern" else 2) * d * cfg.d_ff)
        total += 2.0 * (q + kv + o + mlp)
    return total + 2.0 * d * cfg.vocab_size


def forward_flops(cfg: LMConfig, batch: int, seq_len: int) -> float:
    """Forward FLOPs of a full causal forward pass over (batch, seq_len) tokens."""
    attn = sum(attention_flops(s, cfg.head_dim, batch, seq_len) for s in cfg.layer_specs())
    return linear_flops_per_token(cfg) * batch * seq_len + attn


def train_step_flops(cfg: LMConfig, batch: int, seq_len: int) -> float:
    """Forward plus backward (twice the forward), the usual 3x rule."""
    return 3.0 * forward_flops(cfg, batch, seq_len)
