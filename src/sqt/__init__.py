"""sqt: the query side of attention. One Transformer LM in which every layer chooses where its
queries come from (projection, static table, static rotary vector, or the identity and frozen
random controls) and how many query and key/value heads it has (MHA, GQA, MQA and the Sparse Query
Attention family). `sqt.probe` measures what a trained model's queries do; `sqt.convert` turns one
variant into another."""

from .accounting import active_param_count, param_count
from .attention import Attention, KVCache, attention_layer
from .config import PRESETS, SEED_SIZES, LMConfig, preset
from .generate import generate, sample_next, stream
from .model import BaselineLM, HybridLM, SQTLM, TransformerLM
from .moe import MoE
from .tokenizer import load_tokenizer
from .variants import HEAD_LAYOUTS, VARIANTS, LayerSpec, parse_layer

from_pretrained = TransformerLM.from_pretrained
"""`sqt.from_pretrained(DIR)`: the model of a model directory (`model.save_pretrained(DIR)`),
or of a checkpoint or run directory."""

__version__ = "0.1.0"

__all__ = [
    "Attention", "BaselineLM", "HEAD_LAYOUTS", "HybridLM", "KVCache", "LMConfig", "LayerSpec",
    "MoE", "PRESETS", "SEED_SIZES", "SQTLM", "TransformerLM", "VARIANTS", "active_param_count",
    "attention_layer", "from_pretrained", "generate", "load_tokenizer", "param_count",
    "parse_layer", "preset", "sample_next", "stream",
]
