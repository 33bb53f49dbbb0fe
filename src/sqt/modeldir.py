"""Model directories: `config.json` (format, model config, metadata), `model.safetensors` and
`tokenizer.json`, what `model.save_pretrained` writes and every loader reads; where one stands in a
run directory (its `checkpoint/`) or an older run (files at its top); and the checks that turn a
garbled or mismatched directory into one clear error."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping, Optional

from .config import LMConfig
from .fileset import FileSetError, pending, settled, verify, write_set

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
MODEL_FILES = (CONFIG, WEIGHTS, TOKENIZER)
TRAIN_STATE_FILES = ("train_state.safetensors", "train_state.json")
LEGACY_TRAIN_STATE = "train_state.pt"
CHECKPOINT_FILES = MODEL_FILES + TRAIN_STATE_FILES + (LEGACY_TRAIN_STATE,)
"""Every file a checkpoint directory may hold (beside its manifest)."""
CHECKPOINT_DIR = "checkpoint"
"""A run directory's checkpoint: a model directory plus train state, swapped in as one set."""
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint or model directory that is missing, incomplete, corrupt or incompatible."""


def json_bytes(doc) -> bytes:
    """Standard JSON (no NaN or Infinity), as every file of a model directory is written."""
    return (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode("utf-8")


def weights_bytes(config: LMConfig, state: Mapping) -> bytes:
    """A state dict as safetensors. A tied LM head is left out (safetensors refuses tensors that
    share storage) and re-tied on load."""
    from safetensors.torch import save
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return save(tensors)


def model_files(config: LMConfig, state: Mapping, *, tokenizer=None,
                meta: Optional[Mapping] = None) -> dict[str, bytes]:
    """The files of a model directory, by name. `tokenizer`: anything with `to_json()` (both
    sqt tokenizers); `meta`: JSON fields stored beside the model config in config.json."""
    meta = dict(meta or {})
    clash = sorted({"format", "model"} & set(meta))
    if clash:
        raise ValueError(f"meta has {', '.join(clash)}: those config.json fields are the "
                         "directory's own; expected other names")
    files = {CONFIG: json_bytes({"format": FORMAT_VERSION, "model": config.to_dict(), **meta}),
             WEIGHTS: weights_bytes(config, state)}
    if tokenizer is not None:
        files[TOKENIZER] = tokenizer.to_json().encode("utf-8")
    return files


def write_model_dir(directory, config: LMConfig, state: Mapping, *, tokenizer=None) -> Path:
    """`model.save_pretrained`: the directory replaced as a whole by the model's files."""
    return write_set(directory, model_files(config, state, tokenizer=tokenizer),
                     replaceable=MODEL_FILES)


# ----------------------------------------------------------------------------------- reading

def find_model_dir(path) -> Path:
    """The model directory to read at `path`: a run directory's checkpoint (or the previous one
    a killed save kept aside), a checkpoint or model directory, or an older run whose files stand
    at its top."""
    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise CheckpointError(f"path={path!r}: expected the path of a run, checkpoint or model "
                              "directory")
    p = Path(path)
    if not p.exists():
        kept = settled(p)   # a checkpoint directory named directly, mid-swap
        if kept is not None:
            return kept
        raise CheckpointError(f"checkpoint directory {str(p)!r} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{str(p)!r} is a file: expected a run directory, a checkpoint "
                              f"directory or a model directory ({CONFIG} + {WEIGHTS})")
    inner = settled(p / CHECKPOINT_DIR)
    if inner is not None:
        return inner
    if (p / CONFIG).is_file():
        return p
    if pending(p / CHECKPOINT_DIR):
        raise CheckpointError(f"{str(p)!r} holds no complete checkpoint: its first one was "
                              "still being written when the run stopped")
    raise CheckpointError(f"{str(p)!r} is not a complete checkpoint: expected a run directory "
                          f"(with {CHECKPOINT_DIR}/) or a model directory ({CONFIG} and "
                          f"{WEIGHTS})")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_config(directory) -> dict:
    """config.json of a model directory, checked to be an object of this format with a `model`
    object."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is missing: {str(directory)!r} is not a complete "
                              f"checkpoint (expected {CONFIG} and {WEIGHTS})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e}); the checkpoint is "
                              "corrupt") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{str(path)!r} holds {_short(meta)}: expected a JSON object with "
                              f"\"format\": {FORMAT_VERSION} and a \"model\" object")
    if meta.get("format") != FORMAT_VERSION or not isinstance(meta.get("model"), dict):
        hint = (" (a Hugging Face model directory: `sqt import-hf` reads it)"
                if "model_type" in meta else "")
        raise CheckpointError(
            f"{str(path)!r} has format={_short(meta.get('format'))}, "
            f"model={_short(meta.get('model'))}: expected format {FORMAT_VERSION} and a "
            f"\"model\" object of LMConfig fields{hint}")
    return meta


def model_config(meta: dict, where) -> LMConfig:
    try:
        return LMConfig.from_dict(meta["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{str(where)!r}: incompatible model config: {e}") from None


def read_weights(directory) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} cannot be read ({e}); the checkpoint is "
                              "corrupt") from None


def read_model_dir(path) -> tuple[Path, dict, LMConfig, dict]:
    """(directory, config.json, model config, weights) of the model at `path`, its manifest
    checked when it has one."""
    for attempt in (1, 2):
        directory = find_model_dir(path)
        try:
            verify(directory, members=CHECKPOINT_FILES)
            meta = read_config(directory)
            cfg = model_config(meta, directory / CONFIG)
            return directory, meta, cfg, read_weights(directory)
        except (CheckpointError, FileSetError) as e:
            # A training process swapped a new checkpoint in while this one was being read, and
            # removed the one kept aside: read the new one.
            if attempt == 2 or directory.exists():
                raise CheckpointError(str(e)) from None


def load(model_class, path, device="cpu"):
    """(model in eval mode on `device`, config.json) of the model at `path`, built by
    `model_class.from_state` (TransformerLM's: this module sits below the model and is handed
    it). What `sqt.from_pretrained` and `sqt.checkpoint.load_model` both are."""
    from .utils import resolve_device
    device = resolve_device(device) if isinstance(device, str) else device
    directory, meta, cfg, state = read_model_dir(path)
    try:
        model = model_class.from_state(cfg, state, where=str(directory / WEIGHTS))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return model.to(device).eval(), meta


_SIZE = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[(.*)\]\) "
                   r"from checkpoint, the shape in current model is torch\.Size\(\[(.*)\]\)")
_KEYS = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: (.*?)\.?$")


def describe_mismatch(error: RuntimeError) -> str:
    """torch's load_state_dict error, every line of it, as one line: which tensor, the shape the
    file holds and the one the config implies; tensors missing or unexpected."""
    parts = []
    for line in str(error).splitlines()[1:] or [str(error)]:
        line = line.strip()
        size, keys = _SIZE.match(line), _KEYS.match(line)
        if size:
            parts.append(f"{size[1]} is ({size[2]}) in the file but ({size[3]}) by the config")
        elif keys:
            names = keys[2].replace('"', "")
            parts.append(("missing from the file: " if keys[1] == "Missing"
                          else "in the file but not in the config's model: ") + names)
        elif line:
            parts.append(line)
    return "; ".join(parts)
