"""Checkpoint directories: `model.safetensors` (weights), `config.json` (model config and
free-form metadata), `tokenizer.json` (the tokenizer, when the model has one) and, for training
runs, `train_state.pt` (optimizer, scheduler step, RNG). Every file is written atomically, the
config last, so a directory with a config is complete."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import torch

from .config import LMConfig
from .model import TransformerLM
from .utils import atomic_write_bytes, atomic_write_json

WEIGHTS, CONFIG, TRAIN_STATE = "model.safetensors", "config.json", "train_state.pt"
TOKENIZER = "tokenizer.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, corrupt or incompatible."""


def save_model(directory, model: TransformerLM, *, tokenizer=None, meta: Optional[dict] = None,
               train_state: Optional[dict] = None) -> Path:
    """Write `model` (and its `tokenizer`, as tokenizer.json, when given) into `directory`."""
    from safetensors.torch import save as st_save
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        atomic_write_bytes(directory / TOKENIZER, tokenizer.to_json().encode("utf-8"))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; re-tied on load
    atomic_write_bytes(directory / WEIGHTS, st_save(state))
    if train_state is not None:
        buf = io.BytesIO()
        torch.save(train_state, buf)
        atomic_write_bytes(directory / TRAIN_STATE, buf.getvalue())
    atomic_write_json(directory / CONFIG, {"format": FORMAT_VERSION,
                                           "model": model.config.to_dict(), **(meta or {})})
    return directory


def read_config(directory) -> dict:
    directory = Path(directory)
    path = directory / CONFIG
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is missing: {str(directory)!r} is not a complete "
                              f"checkpoint (expected {CONFIG} and {WEIGHTS})")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e}); the checkpoint is "
                              "corrupt") from None
    if meta.get("format") != FORMAT_VERSION or "model" not in meta:
        raise CheckpointError(f"{str(path)!r} has format={meta.get('format')!r}: expected "
                              f"format {FORMAT_VERSION} with a 'model' section")
    return meta


def load_model(directory, device="cpu") -> tuple[TransformerLM, dict]:
    """The model (in eval mode) and the checkpoint's metadata."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    directory = Path(directory)
    meta = read_config(directory)
    try:
        cfg = LMConfig.from_dict(meta["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{str(directory / CONFIG)!r}: incompatible model config: {e}") \
            from None
    if not (directory / WEIGHTS).is_file():
        raise CheckpointError(f"{str(directory / WEIGHTS)!r} is missing")
    try:
        state = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(directory / WEIGHTS)!r} cannot be read ({e}); the "
                              "checkpoint is corrupt") from None
    model = TransformerLM(cfg)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state.get("tok_emb.weight")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{str(directory / WEIGHTS)!r} does not match its config: "
                              f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval(), meta


def load_train_state(directory) -> Optional[dict]:
    path = Path(directory) / TRAIN_STATE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated or garbled pickles
        raise CheckpointError(f"{str(path)!r} cannot be read ({type(e).__name__}); the "
                              "checkpoint is corrupt") from None


def load_run_tokenizer(path):
    """The tokenizer of a checkpoint directory: its tokenizer.json, else the character tokenizer
    an older run recorded in config.json; None when it has neither (e.g. a model imported from
    Hugging Face without one). A tokenizer with more symbols than the model's vocabulary is a
    CheckpointError."""
    from .tokenizer import load_tokenizer
    directory = Path(path)
    meta = read_config(directory)
    spec = directory / TOKENIZER if (directory / TOKENIZER).is_file() else meta.get("tokenizer")
    if spec is None:
        return None
    try:
        tok = load_tokenizer(spec)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{str(directory)!r}: incompatible tokenizer: {e}") from None
    vocab = meta["model"].get("vocab_size")
    if isinstance(vocab, int) and tok.vocab_size > vocab:
        raise CheckpointError(f"{str(directory)!r}: the tokenizer has {tok.vocab_size} symbols "
                              f"but the model's vocab_size is {vocab}")
    return tok
