"""Reading a Llama-format Hugging Face directory (config.json, safetensors weights, tokenizer.json)
and the checks that refuse, with a reason, what an sqt model cannot express."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from .config import LMConfig
from .variants import LayerSpec

SUPPORTED = ("llama", "mistral", "qwen2")
# What HF's config classes assume when config.json leaves a field out.
_DEFAULT_WINDOW, _DEFAULT_MAX_WINDOW_LAYERS = 4096, 28
_LAYER_TENSORS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                  "mlp.down_proj.weight", "input_layernorm.weight",
                  "post_attention_layernorm.weight")


def _load_weights(d: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    index = d / "model.safetensors.index.json"
    if (d / "model.safetensors").is_file():
        files = [d / "model.safetensors"]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{str(index)!r} is not a safetensors index ({e})") from None
        files = [d / name for name in sorted(set(weight_map.values()))]
    elif any(d.glob("*.bin")) or any(d.glob("*.pt")):
        raise ValueError(f"{str(d)!r} holds pickled PyTorch weights, which are not read (loading "
                         "a pickle can run code); save the model with safetensors first "
                         "(save_pretrained(..., safe_serialization=True))")
    else:
        raise ValueError(f"{str(d)!r} has no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{str(f)!r} cannot be read as safetensors ({e})") from None
    return tensors


def read_hf_dir(hf_dir) -> tuple[dict, dict, Optional[str]]:
    """config.json as a dict, the weights by HF name, and tokenizer.json's text (None if absent)."""
    d = Path(hf_dir)
    if not (d / "config.json").is_file():
        raise ValueError(f"hf_dir={str(d)!r}: no config.json there; expected a Hugging Face "
                         "model directory")
    try:
        hc = json.loads((d / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(d / 'config.json')!r} is not valid JSON ({e})") from None
    if not isinstance(hc, dict):
        raise ValueError(f"{str(d / 'config.json')!r} holds {type(hc).__name__}: expected a JSON "
                         "object (a Hugging Face model config)")
    tok = d / "tokenizer.json"
    return hc, _load_weights(d), tok.read_text(encoding="utf-8") if tok.is_file() else None


def _need(hc: dict, key: str):
    if key not in hc:
        raise ValueError(f"config.json has no {key!r}: expected a complete "
                         f"{hc.get('model_type')} config")
    return hc[key]


def _int(key: str, value) -> int:
    """A config.json size: an integer >= 1 (a whole float such as 128.0 is taken as one)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.json {key}={value!r}: expected an integer >= 1")
    return value


def _float(key: str, value, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (0 <= value < math.inf) or (positive and value == 0):
        raise ValueError(f"config.json {key}={value!r}: expected a finite number "
                         f"{'> 0' if positive else '>= 0'}")
    return float(value)


def _check_shapes(hf: dict, *, vocab: int, d: int, n_q: int, n_kv: int, hd: int, ff: int,
                  n_layers: int) -> None:
    """Refuse weights whose shapes are not the ones config.json describes."""
    want = {"model.embed_tokens.weight": (vocab, d), "lm_head.weight": (vocab, d),
            "model.norm.weight": (d,)}
    layer = {"self_attn.q_proj.weight": (n_q * hd, d), "self_attn.k_proj.weight": (n_kv * hd, d),
             "self_attn.v_proj.weight": (n_kv * hd, d), "self_attn.o_proj.weight": (d, n_q * hd),
             "self_attn.q_proj.bias": (n_q * hd,), "self_attn.k_proj.bias": (n_kv * hd,),
             "self_attn.v_proj.bias": (n_kv * hd,), "mlp.gate_proj.weight": (ff, d),
             "mlp.up_proj.weight": (ff, d), "mlp.down_proj.weight": (d, ff),
             "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}
    want.update({f"model.layers.{i}.{k}": v for i in range(n_layers) for k, v in layer.items()})
    wrong = [f"{k} is {tuple(hf[k].shape)} but config.json makes it {v}"
             for k, v in want.items() if k in hf and tuple(hf[k].shape) != v]
    if wrong:
        raise ValueError(f"the weights do not match config.json: {'; '.join(wrong[:3])}"
                         + (f" ({len(wrong)} tensors differ)" if len(wrong) > 3 else ""))


def _rope_base(hc: dict) -> float:
    rope = hc.get("rope_parameters") or hc.get("rope_scaling") or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"rope_parameters={rope!r}: sqt has one plain RoPE for every layer")
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind != "default":
        raise ValueError(f"rope_type={kind!r}: sqt implements only default RoPE (no scaling); "
                         "this model's positions would be computed differently")
    partial = rope.get("partial_rotary_factor", hc.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial!r}: sqt rotates the whole head")
    return _float("rope_theta", rope.get("rope_theta", hc.get("rope_theta", 10000.0)),
                  positive=True)


def _windows(hc: dict, n_layers: int) -> list[Optional[int]]:
    family = hc["model_type"]
    if family == "llama":
        return [None] * n_layers
    if family == "mistral":
        return [hc.get("sliding_window", _DEFAULT_WINDOW)] * n_layers
    window = hc.get("sliding_window", _DEFAULT_WINDOW) if hc.get("use_sliding_window") else None
    first = hc.get("max_window_layers", _DEFAULT_MAX_WINDOW_LAYERS)
    types = hc.get("layer_types") or ["sliding_attention" if window and i >= first else
                                      "full_attention" for i in range(n_layers)]
    bad = sorted(set(types) - {"sliding_attention", "full_attention"})
    if bad or len(types) != n_layers:
        raise ValueError(f"layer_types={types!r}: expected {n_layers} entries of "
                         "'full_attention' or 'sliding_attention'")
    return [window if t == "sliding_attention" else None for t in types]


def _check_tensors(hf: dict, n_layers: int, tied: bool) -> list[str]:
    """Refuse missing or unknown tensors and nonzero biases; return each layer's query source
    (`rotary` where q_proj has zero weights and a bias: sqt's static rotary query)."""
    want = {"model.embed_tokens.weight", "model.norm.weight"} | (
        set() if tied else {"lm_head.weight"})
    want |= {f"model.layers.{i}.{t}" for i in range(n_layers) for t in _LAYER_TENSORS}
    missing = sorted(want - set(hf))
    if missing:
        raise ValueError(f"the weights lack {missing[:3]} ({len(missing)} missing)")
    extra = sorted(k for k in set(hf) - want if not k.endswith((".bias", "rotary_emb.inv_freq"))
                   and k != "lm_head.weight")
    if extra:
        raise ValueError(f"unexpected tensors {extra[:3]}: sqt has no parameter for them")
    queries = ["proj"] * n_layers
    for name in sorted(k for k in hf if k.endswith(".bias")):
        if not hf[name].any():
            continue
        parts = name.split(".")
        if name.endswith("self_attn.q_proj.bias") and len(parts) > 2 and parts[2].isdigit():
            i = int(parts[2])
            if not hf[f"model.layers.{i}.self_attn.q_proj.weight"].any():
                queries[i] = "rotary"
                continue
            raise ValueError(f"{name} is nonzero: sqt's projected queries have no bias (a bias "
                             "with zero q_proj weights is read as a static rotary query)")
        raise ValueError(f"{name} is nonzero: sqt's modern block has no biases besides the "
                         "static rotary query's")
    return queries


def plain_config(hc: dict, hf: dict) -> tuple[LMConfig, tuple[int, int]]:
    """The sqt config for the HF head layout as it is, and the HF (query, K/V) head counts."""
    family = hc.get("model_type")
    if family not in SUPPORTED:
        raise ValueError(f"model_type={family!r}: expected one of {', '.join(SUPPORTED)} "
                         "(Llama-format decoders with RoPE, RMSNorm and SwiGLU)")
    act = hc.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act={act!r}: sqt's SwiGLU uses silu")
    d = _int("hidden_size", _need(hc, "hidden_size"))
    n_q = _int("num_attention_heads", _need(hc, "num_attention_heads"))
    n_kv = _int("num_key_value_heads", hc.get("num_key_value_heads") or n_q)
    head_dim = _int("head_dim", hc.get("head_dim") or d // n_q)
    if d % head_dim or head_dim % 2:
        raise ValueError(f"head_dim={head_dim} with hidden_size={d}: sqt needs an even head_dim "
                         "that divides d_model (head_dim = d_model / n_heads)")
    if n_q % n_kv:
        raise ValueError(f"num_attention_heads={n_q}, num_key_value_heads={n_kv}: expected the "
                         "query heads to be a multiple of the K/V heads")
    n_layers = _int("num_hidden_layers", _need(hc, "num_hidden_layers"))
    vocab, ff = _int("vocab_size", _need(hc, "vocab_size")), _int(
        "intermediate_size", _need(hc, "intermediate_size"))
    tied = hc.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ValueError(f"config.json tie_word_embeddings={tied!r}: expected true or false")
    queries = _check_tensors(hf, n_layers, tied)
    _check_shapes(hf, vocab=vocab, d=d, n_q=n_q, n_kv=n_kv, hd=head_dim, ff=ff, n_layers=n_layers)
    specs = [LayerSpec(n_q, n_kv, q, w) for q, w in zip(queries, _windows(hc, n_layers))]
    cfg = LMConfig(vocab_size=vocab, d_model=d, n_heads=d // head_dim, n_layers=n_layers,
                   d_ff=ff, max_seq_len=_int("max_position_embeddings",
                                             hc.get("max_position_embeddings", 2048)),
                   block="modern", tie_embeddings=tied, rope_base=_rope_base(hc),
                   norm_eps=_float("rms_norm_eps", hc.get("rms_norm_eps", 1e-6), positive=False),
                   layers=tuple(s.name for s in specs))
    for name, t in hf.items():
        if not t.is_floating_point():
            raise ValueError(f"{name} has dtype {t.dtype}: expected floating-point weights")
    return cfg, (n_q, n_kv)

