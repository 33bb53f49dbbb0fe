"""Hugging Face export and import: an sqt model as a Llama (or, with sliding windows, Qwen2)
directory that `transformers` loads without remote code, and such a directory back as an sqt model.
Head layouts HF's config rejects are written exactly by padding (see hf_heads.py)."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import hf_heads
from .config import LMConfig
from .hf_read import plain_config, read_hf_dir
from .model import TransformerLM
from .utils import atomic_write_bytes, atomic_write_json
from .variants import LayerSpec, variant_name

SQT_BLOCK = "sqt"          # config.json entry recording the exported model's own config
SQT_BLOCK_FORMAT = 1
EOT = "<|endoftext|>"
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM"}
WRITTEN = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
           "tokenizer_config.json")
# Per layer: HF name -> sqt name (the attention projections are split and padded separately).
_LAYER_NAMES = {"input_layernorm.weight": "norm1.weight",
                "post_attention_layernorm.weight": "norm2.weight",
                "mlp.down_proj.weight": "mlp.down.weight"}
_TOP_NAMES = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "norm_f.weight",
              "lm_head.weight": "lm_head.weight"}


# ----------------------------------------------------------------------------------- export

def _exportable_specs(cfg: LMConfig) -> tuple[LayerSpec, ...]:
    if cfg.block != "modern":
        raise ValueError(
            f"block={cfg.block!r} cannot be exported to Hugging Face: no HF causal-LM family has "
            "the classic block's learned absolute positions, LayerNorm, GELU MLP and biased LM "
            "head together (GPT-2, the closest, has no LM-head bias); train with --block modern "
            "(RoPE, RMSNorm, SwiGLU), which exports as Llama")
    if getattr(cfg, "n_experts", 0):
        raise ValueError(f"n_experts={cfg.n_experts}: mixture-of-experts models cannot be "
                         "exported yet (no mapping to an HF MoE family); export a dense model")
    specs = cfg.layer_specs()
    for i, s in enumerate(specs):
        if s.query == "table":
            raise ValueError(
                f"layer {i} ({s.name}) has a static query table: a per-position query is not a "
                "projection of the input, so no Hugging Face attention layer computes it (not "
                "even with pad_mixed); export a model whose layers use proj or rotary queries")
    return specs


def _head_shape(cfg: LMConfig, specs, pad_mixed: bool) -> tuple[int, int]:
    shapes = [hf_heads.natural_shape(s, cfg.d_model) for s in specs]
    if len(set(shapes)) == 1:
        return shapes[0]
    width = hf_heads.mha_width(specs, cfg.d_model)
    if not pad_mixed:
        seen = ", ".join(f"layer {i} {s.name} -> {q}/{kv}"
                         for i, (s, (q, kv)) in enumerate(zip(specs, shapes)))
        raise ValueError(
            f"layers={cfg.layers!r}: the layers need different Hugging Face head shapes ({seen}) "
            "but an HF config has one for all layers; pass pad_mixed=True (sqt export "
            f"--pad-mixed) to write every layer MHA-shaped with {width} heads (same logits, "
            "dead and duplicated heads cost compute)")
    return width, width


def _tokenizer_files(path) -> tuple[str, Optional[int], int]:
    """tokenizer.json's text, the id of its end-of-text token (None if it has none) and its size."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer_json={str(path)!r}: no such file; expected a Hugging Face "
                         "tokenizer.json")
    text = path.read_text(encoding="utf-8")
    try:
        spec = json.loads(text)
        added = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
        ids = list((spec.get("model") or {}).get("vocab", {}).values()) + list(added.values())
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"tokenizer_json={str(path)!r} is not a tokenizer.json ({e})") from None
    return text, added.get(EOT), max(ids, default=-1) + 1


def _export_layer(state: dict, i: int, spec: LayerSpec, p: hf_heads.HeadPlan, cfg: LMConfig,
                  biased: tuple) -> dict:
    """One block's HF tensors. `biased`: the projections the HF family gives a bias (written as
    zeros, except the rotary query's vector)."""
    d, hd, pre = cfg.d_model, cfg.head_dim, f"blocks.{i}."
    qkv = state.pop(pre + "attn.qkv_proj.weight")
    q_rows = spec.n_q_heads * hd if spec.query == "proj" else 0
    q, k, v = qkv.split([q_rows, spec.n_kv_heads * hd, spec.n_kv_heads * hd])
    if spec.query == "identity":    # W_q = [I 0]: the first n_q * head_dim input features
        q = torch.eye(spec.n_q_heads * hd, d, dtype=qkv.dtype)
    elif spec.query == "random":    # the frozen matrix, as an ordinary projection
        q = state.pop(pre + "attn.q_random")
    o = state.pop(pre + "attn.o_proj.weight").view(d, spec.n_attn_heads, hd).transpose(0, 1)
    vec = state.pop(pre + "attn.q_vec") if spec.query == "rotary" else None
    heads = hf_heads.pad(p, q=vec if vec is not None else q.reshape(-1, hd, d),
                         k=k.reshape(-1, hd, d), v=v.reshape(-1, hd, d), o=o)
    out, hf = {}, f"model.layers.{i}."
    if vec is not None:   # the rotary vector is the bias of a projection with zero weights
        out[hf + "self_attn.q_proj.weight"] = qkv.new_zeros(p.n_q * hd, d)
        out[hf + "self_attn.q_proj.bias"] = heads["q"].reshape(-1)
    else:
        out[hf + "self_attn.q_proj.weight"] = heads["q"].reshape(-1, d)
    for name in ("k", "v"):
        out[hf + f"self_attn.{name}_proj.weight"] = heads[name].reshape(-1, d)
    out[hf + "self_attn.o_proj.weight"] = heads["o"].transpose(0, 1).reshape(d, -1)
    for name in biased:
        key = hf + f"self_attn.{name}_proj.bias"
        if key not in out:
            out[key] = qkv.new_zeros(out[hf + f"self_attn.{name}_proj.weight"].shape[0])
    gate, up = state.pop(pre + "mlp.up.weight").chunk(2)
    out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = gate, up
    for hf_name, sqt_name in _LAYER_NAMES.items():
        out[hf + hf_name] = state.pop(pre + sqt_name)
    return out


def _hf_config(cfg: LMConfig, specs, shape, eos: Optional[int], dtype: torch.dtype,
               rotary: bool) -> dict:
    windows = sorted({s.window for s in specs if s.window})
    if len(windows) > 1:
        raise ValueError(f"layers={cfg.layers!r} use different sliding windows {windows}: "
                         "Hugging Face's Qwen2 config has one sliding_window for every windowed "
                         "layer; use one window size")
    family = "qwen2" if windows else "llama"
    hc = {"architectures": [FAMILIES[family]], "model_type": family,
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
          "num_attention_heads": shape[0], "num_key_value_heads": shape[1],
          "head_dim": cfg.head_dim, "hidden_act": "silu",
          "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
          "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
          "rope_theta": cfg.rope_base,   # read by transformers 4.x, which predates rope_parameters
          "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
          "initializer_range": 0.02, "use_cache": True, "bos_token_id": None,
          "eos_token_id": eos, "pad_token_id": None,
          "dtype": str(dtype).removeprefix("torch.")}
    if family == "llama":
        hc.update(attention_bias=rotary, mlp_bias=False)
    else:
        hc.update(use_sliding_window=True, sliding_window=windows[0],
                  layer_types=["sliding_attention" if s.window else "full_attention"
                               for s in specs])
    hc[SQT_BLOCK] = {"format": SQT_BLOCK_FORMAT, "model": cfg.to_dict()}
    return hc


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _weight_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype={dtype!r}: expected None (the model's) or one of {', '.join(DTYPES)}")


def export_hf(model: TransformerLM, out_dir, *, tokenizer_json=None, pad_mixed: bool = False,
              dtype: Optional[torch.dtype] = None) -> Path:
    """Write `model` as a Hugging Face directory (config.json, model.safetensors,
    generation_config.json and, given a tokenizer.json path, the tokenizer files) that
    `AutoModelForCausalLM.from_pretrained` loads without remote code and that computes the same
    logits. `pad_mixed` writes a mix of head layouts with every layer MHA-shaped; `dtype` casts
    the weights (default: the model's). Raises ValueError for what HF cannot express."""
    from safetensors.torch import save as st_save
    model = getattr(model, "_orig_mod", model)   # torch.compile's wrapper prefixes every name
    if not isinstance(model, TransformerLM):
        raise ValueError(f"model={type(model).__name__}: expected an sqt TransformerLM")
    cfg = model.config
    specs = _exportable_specs(cfg)
    shape = _head_shape(cfg, specs, pad_mixed)
    text, eos, tok_size = _tokenizer_files(tokenizer_json) if tokenizer_json else (None, None, 0)
    if tok_size > cfg.vocab_size:
        raise ValueError(f"tokenizer_json={str(tokenizer_json)!r} has {tok_size} tokens but the "
                         f"model's vocab_size is {cfg.vocab_size}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    dtype = _weight_dtype(dtype) or state["tok_emb.weight"].dtype
    rotary = any(s.query == "rotary" for s in specs)
    hc = _hf_config(cfg, specs, shape, eos, dtype, rotary)
    biased = ("q", "k", "v") if hc["model_type"] == "qwen2" else ("q", "k", "v", "o") * rotary
    tensors = {}
    for i, spec in enumerate(specs):
        tensors.update(_export_layer(state, i, spec, hf_heads.plan(spec, *shape), cfg, biased))
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")   # HF re-ties it to the embedding
    tensors.update({hf: state.pop(sq) for hf, sq in _TOP_NAMES.items() if sq in state})
    if state:   # a parameter this mapping does not know would be silently dropped
        raise ValueError(f"model has parameters the Hugging Face export does not map: "
                         f"{sorted(state)}")
    out = Path(out_dir)
    if out.is_file():
        raise ValueError(f"out_dir={str(out)!r} is a file: expected a new or empty directory")
    stray = sorted(p.name for p in out.iterdir() if p.name not in WRITTEN) if out.is_dir() else []
    if stray:
        raise ValueError(f"out_dir={str(out)!r} holds other files ({', '.join(stray[:5])}); "
                         "export into an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    # An earlier export's config.json goes first: until the new one is written last, the
    # directory reads as incomplete, never as the old config over the new weights.
    (out / "config.json").unlink(missing_ok=True)
    atomic_write_bytes(out / "model.safetensors", st_save(
        {k: v.to(dtype).contiguous() for k, v in tensors.items()}, metadata={"format": "pt"}))
    atomic_write_json(out / "generation_config.json", {
        "bos_token_id": None, "eos_token_id": eos, "pad_token_id": eos})
    if text is not None:
        atomic_write_bytes(out / "tokenizer.json", text.encode("utf-8"))
        atomic_write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "model_max_length": cfg.max_seq_len, "eos_token": EOT if eos is not None else None})
    atomic_write_json(out / "config.json", hc)   # last: a directory with a config is complete
    return out


def export_checkpoint(run_dir, out_dir, *, pad_mixed: bool = False,
                      dtype: Optional[torch.dtype] = None) -> Path:
    """`sqt export RUN --format hf --out DIR`: an sqt checkpoint directory (with its tokenizer:
    its tokenizer.json as it is, or the character tokenizer an older checkpoint keeps in
    config.json) as a Hugging Face directory."""
    from .checkpoint import load_model, load_run_tokenizer, resolve
    model, _ = load_model(run_dir)
    tok_file = resolve(run_dir) / "tokenizer.json"
    tok = None if tok_file.is_file() else load_run_tokenizer(run_dir)
    if tok is None:
        return export_hf(model, out_dir, tokenizer_json=tok_file if tok_file.is_file() else None,
                         pad_mixed=pad_mixed, dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        return export_hf(model, out_dir, tokenizer_json=tok.save(Path(tmp) / "tokenizer.json"),
                         pad_mixed=pad_mixed, dtype=dtype)


# ----------------------------------------------------------------------------------- import

def _import_layer(hf: dict, i: int, spec: LayerSpec, p: hf_heads.HeadPlan, d: int,
                  hd: int) -> dict:
    pre = f"model.layers.{i}.self_attn."
    q_w, q_b = hf[pre + "q_proj.weight"], hf.get(pre + "q_proj.bias")
    if spec.query == "rotary" and q_w.any():
        raise hf_heads.NotRestorable(f"layer {i}: the rotary query's projection weights are no "
                                     "longer zero")
    q = q_b.view(p.n_q, hd) if spec.query == "rotary" else q_w.view(p.n_q, hd, d)
    heads = hf_heads.unpad(p, spec, q=q, k=hf[pre + "k_proj.weight"].view(p.n_kv, hd, d),
                           v=hf[pre + "v_proj.weight"].view(p.n_kv, hd, d),
                           o=hf[pre + "o_proj.weight"].view(d, p.n_q, hd).transpose(0, 1))
    out = {f"blocks.{i}.attn.o_proj.weight": heads["o"].transpose(0, 1).reshape(d, -1)}
    kv = [heads["k"].reshape(-1, d), heads["v"].reshape(-1, d)]
    if spec.query == "rotary":
        out[f"blocks.{i}.attn.q_vec"] = heads["q"]
        out[f"blocks.{i}.attn.qkv_proj.weight"] = torch.cat(kv)
    elif spec.query in ("identity", "random"):
        q = heads["q"].reshape(-1, d)
        if spec.query == "identity" and not torch.equal(q, torch.eye(*q.shape, dtype=q.dtype)):
            raise hf_heads.NotRestorable(f"layer {i}: the identity query's projection is no "
                                         "longer [I 0]")
        if spec.query == "random":   # _build checks it is still the layer's own draw
            out[f"blocks.{i}.attn.q_random"] = q
        out[f"blocks.{i}.attn.qkv_proj.weight"] = torch.cat(kv)
    else:
        out[f"blocks.{i}.attn.qkv_proj.weight"] = torch.cat([heads["q"].reshape(-1, d)] + kv)
    mlp = f"model.layers.{i}.mlp."
    out[f"blocks.{i}.mlp.up.weight"] = torch.cat([hf[mlp + "gate_proj.weight"],
                                                  hf[mlp + "up_proj.weight"]])
    for hf_name, sqt_name in _LAYER_NAMES.items():
        out[f"blocks.{i}.{sqt_name}"] = hf[f"model.layers.{i}.{hf_name}"]
    return out


def _build(cfg: LMConfig, hf: dict, shape: tuple[int, int]) -> TransformerLM:
    state = {}
    for i, spec in enumerate(cfg.layer_specs()):
        state.update(_import_layer(hf, i, spec, hf_heads.plan(spec, *shape), cfg.d_model,
                                   cfg.head_dim))
    state.update({sq: hf[name] for name, sq in _TOP_NAMES.items() if name in hf})
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model = TransformerLM(cfg)
    for name, drawn in model.named_buffers():
        if name.endswith("q_random") and not torch.equal(state[name].float(), drawn):
            raise hf_heads.NotRestorable(f"{name}: the random query's matrix is no longer the "
                                         f"one query_seed={cfg.query_seed} draws")
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise ValueError(f"the weights do not match config.json: {str(e).splitlines()[-1]}") \
            from None
    return model.eval()


def _recorded_config(hc: dict, plain: LMConfig) -> Optional[LMConfig]:
    """The config an sqt export recorded, if it still describes this HF model."""
    block = hc.get(SQT_BLOCK)
    if not isinstance(block, dict) or block.get("format") != SQT_BLOCK_FORMAT:
        return None
    try:
        cfg = LMConfig.from_dict(block["model"])
    except (KeyError, TypeError, ValueError):
        return None
    same = ("vocab_size", "d_model", "n_layers", "d_ff", "tie_embeddings", "rope_base", "norm_eps")
    windows = [s.window for s in cfg.layer_specs()] == [s.window for s in plain.layer_specs()]
    if cfg.block == "modern" and windows and all(
            getattr(cfg, f) == getattr(plain, f) for f in same):
        return cfg
    return None


def import_hf(hf_dir) -> tuple[TransformerLM, Optional[str]]:
    """A Llama-format Hugging Face directory (LlamaForCausalLM, MistralForCausalLM or
    Qwen2ForCausalLM with zero K/V biases; safetensors, one file or sharded) as an sqt model
    (float32, eval mode) and its tokenizer.json text (None if it has none). A directory sqt
    exported comes back as the model that was exported. Raises ValueError for what sqt cannot
    express."""
    hc, hf, tok_text = read_hf_dir(hf_dir)
    plain, shape = plain_config(hc, hf)
    recorded = _recorded_config(hc, plain)
    if recorded is not None:
        try:
            return _build(recorded, hf, shape), tok_text
        except (hf_heads.NotRestorable, ValueError) as e:
            warnings.warn(f"{str(hf_dir)!r} was exported from sqt layers={recorded.layers!r} but "
                          f"its weights no longer have that structure ({e}); importing the HF "
                          "head layout as it is")
    n_heads = plain.n_heads
    layers = [variant_name(s, n_heads) for s in plain.layer_specs()]
    cfg = plain.with_layers(layers[0] if len(set(layers)) == 1 else tuple(layers))
    return _build(cfg, hf, shape), tok_text


def import_checkpoint(hf_dir, out_dir) -> Path:
    """`sqt import-hf DIR --out RUN`: a Hugging Face directory as an sqt checkpoint directory,
    its tokenizer.json copied when it has one."""
    from .checkpoint import save_model
    from .tokenizer import tokenizer_from_json
    model, tok_text = import_hf(hf_dir)
    tok = tokenizer_from_json(tok_text) if tok_text is not None else None
    return save_model(out_dir, model, tokenizer=tok,
                      meta={"source": {"format": "hf", "path": str(hf_dir)}})


__all__ = ["export_hf", "import_hf", "export_checkpoint", "import_checkpoint"]
