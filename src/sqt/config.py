"""Model configuration: LMConfig (every layer's variant from sqt.variants, the block, the
attention op, mixture of experts), and the size presets with their training recipes. Everything
here is plain data; validation errors name the field, the value and what is accepted."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Union

from .variants import (HEAD_LAYOUTS, VARIANTS, LayersArg, LayerSpec, check_int, check_number,
                       check_query_width, parse_layer)

__all__ = [
    "BACKENDS", "BLOCKS", "DEVICE_TYPES", "MOE_IMPLS", "PRESETS", "RECIPES", "SEED_SIZES",
    "LMConfig", "preset", "recipe_settings",
    # users import these from here too; their home is sqt.variants
    "HEAD_LAYOUTS", "VARIANTS", "LayerSpec", "parse_layer",
]

BLOCKS = ("classic", "modern")
"""`classic`: the SQT seed's block (learned absolute positions, LayerNorm, GELU MLP, biases).
`modern`: the SQA papers' block (RoPE, RMSNorm, SwiGLU, no biases)."""

BACKENDS = ("auto", "sdpa", "flex", "flash", "eager")
"""The attention op: `sdpa` (PyTorch scaled_dot_product_attention, K/V shared via enable_gqa),
`flex` (FlexAttention, for sliding windows), `flash` (FlashAttention-4 on Hopper GPUs, the optional
`flash` extra), `eager` (reference math, for tests). `auto` picks sdpa for full causal layers (flash
where it is installed and measured faster: sqt.kernels.AUTO_FLASH) and flex for windowed ones."""

MOE_IMPLS = ("grouped", "loop")
"""How a mixture-of-experts layer runs its experts: `grouped` (tokens sorted by expert, one grouped
matmul per projection, no host synchronisation: the training path) or `loop` (a Python loop over
experts with boolean masks: the reference the tests compare against)."""


@dataclass(frozen=True)
class LMConfig:
    """A decoder-only language model. `layers` is one variant for every layer or one per layer."""

    vocab_size: int = field(default=65, metadata={"help": "token vocabulary size"})
    d_model: int = field(default=256, metadata={"help": "model width (the residual stream)"})
    n_heads: int = field(default=4, metadata={
        "help": "nominal head count H: head_dim = d_model / H; variants are fractions of H"})
    n_layers: int = field(default=4, metadata={"help": "number of Transformer blocks"})
    d_ff: int = field(default=512, metadata={"help": "hidden width of each block's MLP"})
    max_seq_len: int = field(default=256, metadata={
        "help": "longest sequence the model takes (learned positions, static query tables)"})
    block: str = field(default="classic", metadata={
        "help": "classic (the SQT seed's: learned positions, LayerNorm, GELU, biases) or modern "
                "(the SQA papers': RoPE, RMSNorm, SwiGLU, no biases)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability in [0, 1)"})
    tie_embeddings: bool = field(default=False, metadata={
        "help": "share the token embedding with the LM head"})
    backend: str = field(default="auto", metadata={
        "help": "attention op: auto, sdpa, flex, flash or eager (auto: sdpa, or flash where "
                "installed and measured faster; flex for windows)"})
    rope_base: float = field(default=10000.0, metadata={
        "help": "RoPE base frequency (modern block and rotary queries)"})
    norm_eps: float = field(default=1e-5, metadata={"help": "epsilon of the norms"})
    layers: Union[str, tuple] = field(default="mha", metadata={
        "help": "one variant for every layer, or one per layer: a name (mha gqa mqa sqa ssqa "
                "xsqa xsmqa lsqa rsqa sqt srq idq rndq) or nq/nkv, with an optional query: prefix "
                "(proj table rotary identity random) and @window suffix"})
    query_seed: int = field(default=0, metadata={
        "help": "seed of the frozen random query projections (query source random); each layer "
                "draws from it and its own index"})
    # Training only: keep each block's input and recompute the block in the backward pass, which
    # costs one more forward but holds one block's activations at a time instead of all of them
    # (what lets long sequences through a wide model on one GPU).
    checkpoint_blocks: bool = field(default=False, metadata={
        "help": "recompute each block in the backward pass: less memory, about one more forward"})
    # Mixture of experts (sqt.moe): every block's feed-forward becomes a router over SwiGLU experts.
    n_experts: int = field(default=0, metadata={
        "help": "experts per feed-forward layer; 0 keeps the dense MLP"})
    top_k: int = field(default=2, metadata={
        "help": "experts each token is sent to (1..n_experts); weights renormalised when > 1"})
    expert_d_ff: int | None = field(default=None, metadata={
        "help": "hidden width of each SwiGLU expert; None: d_ff"})
    moe_aux_coef: float = field(default=0.01, metadata={
        "help": "weight of the Switch load-balancing loss E * sum_i f_i * P_i in the training loss"})
    moe_z_coef: float = field(default=0.0, metadata={
        "help": "weight of the router z-loss mean(logsumexp(logits)^2); 0 disables it"})
    moe_impl: str = field(default="grouped", metadata={
        "help": "expert computation: grouped (sorted tokens, grouped matmuls, no host sync) or "
                "loop (reference loop over experts)"})

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_seq_len"):
            check_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}: "
                             "head_dim = d_model // n_heads must be a whole number")
        if self.block not in BLOCKS:
            raise ValueError(f"block={self.block!r}: expected one of {', '.join(BLOCKS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if isinstance(self.dropout, bool) or not (
                isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout={self.dropout!r}: expected a number in [0, 1)")
        check_number("rope_base", self.rope_base, positive=True)
        check_number("norm_eps", self.norm_eps)
        for name in ("tie_embeddings", "checkpoint_blocks"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected True or False")
        if isinstance(self.layers, LayerSpec):
            object.__setattr__(self, "layers", self.layers.name)
        if not isinstance(self.layers, (str, tuple, list)):
            raise ValueError(f"layers={self.layers!r}: expected a variant string or a list of "
                             "them, one per layer")
        if not isinstance(self.layers, str):
            # Normalise to a tuple of strings so configs stay hashable and serialise to JSON.
            object.__setattr__(self, "layers", tuple(
                s.name if isinstance(s, LayerSpec) else s for s in self.layers))
            if len(self.layers) != self.n_layers:
                raise ValueError(f"layers has {len(self.layers)} entries but n_layers="
                                 f"{self.n_layers}: give one variant, or one per layer")
        check_int("query_seed", self.query_seed, minimum=0)
        if self.query_seed >= 2 ** 44:   # 1_000_003 * query_seed + layer seeds a torch generator
            raise ValueError(f"query_seed={self.query_seed}: expected an integer in [0, 2**44)")
        for i, spec in enumerate(self.layer_specs()):  # every spec against n_heads, now
            check_query_width(spec, self.d_model, self.head_dim, where=f"layer {i}: ")
        self._check_moe()

    def _check_moe(self):
        check_int("n_experts", self.n_experts, minimum=0)
        check_int("top_k", self.top_k)
        if self.expert_d_ff is not None:
            check_int("expert_d_ff", self.expert_d_ff)
        for name in ("moe_aux_coef", "moe_z_coef"):
            check_number(name, getattr(self, name))
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl={self.moe_impl!r}: expected one of {', '.join(MOE_IMPLS)}")
        if not self.n_experts:
            return
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} exceeds n_experts={self.n_experts}: a token "
                             "cannot be sent to more experts than there are")
        if self.block != "modern":
            raise ValueError(f"n_experts={self.n_experts} with block={self.block!r}: experts are "
                             "SwiGLU feed-forwards, which only the modern block has; use "
                             "block='modern' or n_experts=0")
        # The CUDA grouped kernel reads rows through TMA: every row stride must be a multiple of
        # 16 bytes, i.e. of 8 bf16 elements.
        for name, width in (("d_model", self.d_model), ("expert_d_ff", self.expert_width)):
            if self.moe_impl == "grouped" and width % 8:
                raise ValueError(f"{name}={width} with moe_impl='grouped': the grouped expert "
                                 "matmul needs widths that are multiples of 8 (16-byte rows in "
                                 "bf16); choose such a width or moe_impl='loop'")

    @property
    def expert_width(self) -> int:
        """Hidden width of each SwiGLU expert."""
        return self.d_ff if self.expert_d_ff is None else self.expert_d_ff

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model can read, or None where nothing limits it (RoPE and no
        static query table)."""
        absolute = self.block == "classic" or any(s.query == "table" for s in self.layer_specs())
        return self.max_seq_len if absolute else None

    def layer_specs(self) -> tuple[LayerSpec, ...]:
        names = [self.layers] * self.n_layers if isinstance(self.layers, str) else self.layers
        return tuple(parse_layer(s, self.n_heads) for s in names)

    def with_layers(self, layers: LayersArg) -> "LMConfig":
        if isinstance(layers, (str, LayerSpec)):
            layers = layers.name if isinstance(layers, LayerSpec) else layers
        return dataclasses.replace(self, layers=layers if isinstance(layers, str) else tuple(layers))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = self.layers if isinstance(self.layers, str) else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config has unknown fields {unknown}: expected a subset of "
                             f"{sorted(known)}")
        d = dict(d)
        if isinstance(d.get("layers"), list):
            d["layers"] = tuple(d["layers"])
        return cls(**d)


# Size presets. The seed's three sizes are at vocab 65, context 256, classic block; each has a head
# count divisible by 4 so every named variant exists at every size. `sqa-dense` is the SQA paper's
# dense model.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=65, d_model=128, n_heads=4, n_layers=2, d_ff=256, max_seq_len=256),
    "small": dict(vocab_size=65, d_model=256, n_heads=4, n_layers=4, d_ff=512, max_seq_len=256),
    "medium": dict(vocab_size=65, d_model=384, n_heads=8, n_layers=5, d_ff=1024, max_seq_len=256),
    "sqa-dense": dict(vocab_size=10_000, d_model=256, n_heads=16, n_layers=8, d_ff=768,
                      max_seq_len=1024, block="modern"),
    # The SQA model card's micro MoE (SQAT-mm and its GQA/MQA references): untied embeddings, no
    # biases. Parameters, ours vs the card (layers=...):
    #   gqa 8,614,528 vs 8.67M (-0.64 %)   mqa 8,589,952 vs 8.64M (-0.58 %)
    #   sqa 8,516,224 vs 8.57M (-0.63 %)   ssqa 8,565,376 vs 8.62M (-0.63 %)
    #   xsqa 8,467,072 vs 8.52M (-0.62 %)
    # The variants differ from each other exactly as on the card; the constant 51,080 between is
    # biases our blocks do not have: the card's library (RxNN, MoeFeedForward) gives every expert
    # an up bias (2 x 256) and a down bias (128), 12 x 640 x 6 layers = 46,080, and its LM head is
    # an nn.Linear with a bias, 5,000. With those the five counts are 8.67 / 8.64 / 8.57 / 8.62 /
    # 8.52M, the card's figures to the digit.
    "sqat-micro": dict(vocab_size=5000, d_model=128, n_heads=8, n_layers=6, d_ff=256,
                       max_seq_len=256, block="modern", n_experts=12, top_k=2,
                       moe_aux_coef=0.01),
}
SEED_SIZES = ("tiny", "small", "medium")
"""The SQT seed's three sizes: the sizes the sweeps train and the benchmarks report first."""

# Per-preset training recipes: TrainConfig fields plus the model's dropout. A value that depends on
# the device is a {"cuda": ..., "cpu": ...} pair. On CUDA the seed sizes train for the seed's budget
# (2000 steps of 64 x 256 tokens): the learning rate peaks after `warmup` steps and decays by cosine
# to lr/10; smaller models tolerate a higher rate and need less regularisation in 33M tokens, and
# medium is nanoGPT shakespeare_char's regime (probes: bench/results/sweep/*-probe-*). On the CPU a
# default run takes about three minutes on two cores: tiny took 0.15 s per step of 16 x 256 tokens
# there (bench/results/sweep/20261123-162306-cpu), small and medium about 7x and 10x that (they
# have 7x and 22x its FLOPs but use the cores better). There, warm-up is a tenth of the run.
_SEED_RECIPE = dict(seq_len=256, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
                    batch_size={"cuda": 64, "cpu": 16}, eval_batches={"cuda": 20, "cpu": 4})
RECIPES: dict[str, dict] = {
    "tiny": dict(_SEED_RECIPE, lr=3e-3, dropout=0.0, steps={"cuda": 2000, "cpu": 1000},
                 warmup={"cuda": 100, "cpu": 100}),
    "small": dict(_SEED_RECIPE, lr=2e-3, dropout=0.1, steps={"cuda": 2000, "cpu": 200},
                  warmup={"cuda": 100, "cpu": 20}),
    "medium": dict(_SEED_RECIPE, lr=1.5e-3, dropout=0.15, steps={"cuda": 2000, "cpu": 120},
                   warmup={"cuda": 100, "cpu": 12}),
    # The SQA blog's dense model on a 10k BPE of Wikipedia (bench.quality's dense regime):
    # enwiki_100M gives 25.5M training tokens, so two epochs are ~51M tokens a run. 64 x 1024 =
    # 65,536 tokens a step makes that ~780 optimizer steps (128 x 1024 would leave ~390, few
    # updates for a 10M-parameter model), while a step stays large enough to keep an H100 busy
    # (1k x 128 took 68-100 ms eager). lr 2e-3, the model card's for the same family and the rate
    # our small char model trains at, after a 50-step warm-up (6 % of the run), cosine to lr/10.
    # The default budget is those ~2 epochs. 4 evaluation batches are 262k tokens, about the
    # whole validation split (1 % of the corpus). Not tuned on a GPU yet.
    "sqa-dense": dict(seq_len=1024, lr=2e-3, dropout=0.0, weight_decay=0.1, beta1=0.9, beta2=0.99,
                      grad_clip=1.0, batch_size={"cuda": 64, "cpu": 4},
                      eval_batches={"cuda": 4, "cpu": 2}, steps={"cuda": 780, "cpu": 50},
                      warmup={"cuda": 50, "cpu": 5}),
    # The model card's schedule: lr 2e-3, cosine annealing without warm-up, context 256. Its batch
    # is not stated; 128 x 256 tokens per step is ours.
    "sqat-micro": dict(seq_len=256, lr=2e-3, dropout=0.0, weight_decay=0.1, beta1=0.9,
                       beta2=0.99, grad_clip=1.0, batch_size={"cuda": 128, "cpu": 8},
                       eval_batches={"cuda": 20, "cpu": 2}, steps={"cuda": 2000, "cpu": 50},
                       warmup={"cuda": 0, "cpu": 0}),
}
DEVICE_TYPES = ("cuda", "cpu")


def recipe_settings(name: str, device_type: str) -> dict:
    """The recipe of preset `name` for a device type, as plain field values."""
    if name not in RECIPES:
        raise ValueError(f"preset {name!r}: expected one of {', '.join(RECIPES)}")
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device_type={device_type!r}: expected one of {', '.join(DEVICE_TYPES)}")
    return {k: v[device_type] if isinstance(v, dict) else v for k, v in RECIPES[name].items()}


def preset(name: str, **overrides) -> LMConfig:
    """An LMConfig from a named size preset; keyword arguments override any field."""
    if name not in PRESETS:
        raise ValueError(f"preset {name!r}: expected one of {', '.join(PRESETS)}")
    return LMConfig(**{**PRESETS[name], **overrides})
