"""sqt: the query side of attention. One Transformer LM in which every layer chooses where its
queries come from (projection, static table, static rotary vector) and how many query and key/value
heads it has (MHA, GQA, MQA and the Sparse Query Attention family)."""

from .attention import Attention, KVCache
from .config import (HEAD_LAYOUTS, PRESETS, VARIANTS, LayerSpec, LMConfig, active_param_count,
                     param_count, parse_layer, preset)
from .generate import generate, sample_next, stream
from .model import BaselineLM, HybridLM, SQTLM, TransformerLM
from .moe import MoE

__version__ = "0.1.0"

__all__ = [
    "Attention", "BaselineLM", "HEAD_LAYOUTS", "HybridLM", "KVCache", "LMConfig", "LayerSpec",
    "MoE", "PRESETS", "SQTLM", "TransformerLM", "VARIANTS", "active_param_count", "generate",
    "param_count", "parse_layer", "preset", "sample_next", "stream",
]
