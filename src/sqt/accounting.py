"""Parameters, FLOPs and bytes moved, from the architecture alone: the one home of these formulas,
so that model size, achieved TFLOP/s, MFU and bandwidth bounds mean the same thing in training, the
engine and every benchmark. Tests check each formula against the built model."""

from __future__ import annotations

from .config import LMConfig
from .variants import LayerSpec


def param_count(cfg: LMConfig) -> int:
    """Trainable parameters of `TransformerLM(cfg)`. Tests check this formula against the built
    model, so it is the one place the model's size is written down."""
    d, hd, classic = cfg.d_model, cfg.head_dim, cfg.block == "classic"
    bias = 1 if classic else 0
    norm = 2 * d if classic else d                      # LayerNorm has a bias, RMSNorm not
    total = cfg.vocab_size * d                          # token embedding
    if classic:
        total += cfg.max_seq_len * d                    # learned absolute positions
    for spec in cfg.layer_specs():
        q_out, kv_out = spec.n_q_heads * hd, spec.n_kv_heads * hd
        if spec.query == "proj":
            total += d * q_out + bias * q_out
        elif spec.query == "table":
            total += cfg.max_seq_len * q_out
        elif spec.query == "rotary":
            total += q_out                              # one vector per head, rotated by RoPE
        # identity and random queries train nothing (random's matrix is a frozen buffer)
        total += 2 * (d * kv_out + bias * kv_out)       # keys and values (in qkv_proj)
        total += spec.n_attn_heads * hd * d + bias * d  # o_proj
        total += feed_forward_params(cfg)               # MLP, or router + experts
        total += 2 * norm
    total += norm                                       # final norm
    if not cfg.tie_embeddings:
        total += d * cfg.vocab_size                     # LM head weight (tied: the embedding)
    return total + bias * cfg.vocab_size


def feed_forward_params(cfg: LMConfig, *, active: bool = False) -> int:
    """Parameters of one block's feed-forward: the dense MLP, or the router plus the SwiGLU experts
    (with `active`, the router plus the top_k experts a token is sent to)."""
    d = cfg.d_model
    if cfg.n_experts:
        experts = cfg.top_k if active else cfg.n_experts
        return d * cfg.n_experts + experts * 3 * d * cfg.expert_width
    if cfg.block == "classic":
        return 2 * d * cfg.d_ff + cfg.d_ff + d          # GELU MLP with biases
    return 3 * d * cfg.d_ff                             # SwiGLU: gate, up, down


def active_param_count(cfg: LMConfig) -> int:
    """Parameters one token uses: all of `param_count` but the experts it is not sent to (equal to
    `param_count` for a dense model)."""
    unused = feed_forward_params(cfg) - feed_forward_params(cfg, active=True)
    return param_count(cfg) - cfg.n_layers * unused


# -- FLOPs ---------------------------------------------------------------------------------------

def attention_flops(spec: LayerSpec, head_dim: int, batch: int, q_len: int, *,
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


# FlashAttention's benchmarks credit the backward with 2.5 forwards: it runs five matmuls of the
# forward's size (recomputed scores, dV, dP, dQ, dK) to the forward's two.
ATTENTION_BACKWARD_FACTOR = 2.5


def attention_train_flops(spec: LayerSpec, head_dim: int, batch: int, q_len: int) -> float:
    """Forward plus backward FLOPs of one layer's causal attention op, counted as FlashAttention
    counts them (see ATTENTION_BACKWARD_FACTOR)."""
    return (1.0 + ATTENTION_BACKWARD_FACTOR) * attention_flops(spec, head_dim, batch, q_len)


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
    """Forward FLOPs per token of every matmul with weights (projections, MLP, LM head)."""
    d, hd = cfg.d_model, cfg.head_dim
    total = 0.0
    for spec in cfg.layer_specs():
        # A frozen random query is still a matmul; the identity query is a slice of the input.
        q = d * spec.n_q_heads * hd if spec.query in ("proj", "random") else 0
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


# -- bytes moved ---------------------------------------------------------------------------------

def kv_bytes_per_token(cfg: LMConfig, *, bytes_per_element: int) -> int:
    """Bytes of K and V one position adds to the KV cache of one sequence."""
    return sum(2 * s.n_kv_heads * cfg.head_dim * bytes_per_element for s in cfg.layer_specs())


def weight_bytes_per_decode_step(cfg: LMConfig, batch: int, *, bytes_per_element: int) -> int:
    """Bytes of parameters a decode step (one new token for each of `batch` sequences) reads:
    every matrix once (frozen random query matrices included); of each lookup table (token and position embeddings, static query tables)
    only the rows of the current tokens. A tied LM head reads the whole embedding matrix, so
    tying the embeddings changes nothing here."""
    d, hd = cfg.d_model, cfg.head_dim
    tables, row = cfg.vocab_size * d, d                 # token embedding
    if cfg.block == "classic":
        tables, row = tables + cfg.max_seq_len * d, row + d
    frozen = 0                                          # random queries' matrices: read, not trained
    for spec in cfg.layer_specs():
        if spec.query == "table":
            tables += cfg.max_seq_len * spec.n_q_heads * hd
            row += spec.n_q_heads * hd
        elif spec.query == "random":
            frozen += d * spec.n_q_heads * hd
    whole = param_count(cfg) - tables + (cfg.vocab_size * d if cfg.tie_embeddings else 0)
    return (whole + frozen + batch * row) * bytes_per_element
