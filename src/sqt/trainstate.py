"""A training run's state without pickle: its tensors (optimizer moments and step counters, RNG
states as uint8 tensors) in `train_state.safetensors`, everything else (step, curves, best, loss
sums, the optimizer's settings) in `train_state.json`. Nothing in either file can run code.

Older runs kept a pickled `train_state.pt`. It is read with torch's weights-only unpickler
(`torch.load(weights_only=True)`), which builds tensors and plain containers and numbers
(dict, list, tuple, int, float, bool, str, None) and nothing else: no other class, no function,
so a file that asks for anything more is refused, not executed. No global is added to what it
allows."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Optional

import torch

from .modeldir import LEGACY_TRAIN_STATE as LEGACY, TRAIN_STATE_FILES as FILES
from .modeldir import CheckpointError, json_bytes

TENSORS, SCALARS = FILES
REQUIRED = {"optimizer": dict, "step": int, "curves": list, "best": list, "loss_sum": float,
            "loss_n": int, "rng_cpu": torch.Tensor}
"""The fields every train state has, and their types (an int passes for a float)."""

# A nested structure as JSON: a tensor is {"$tensor": key} (its data under that key in the
# safetensors file); tuples, dicts whose keys are not plain strings (the optimizer's parameter
# indices) and non-finite floats have a tagged form, so the structure reads back exactly.
_TAGS = ("$tensor", "$tuple", "$items", "$float")


def pack(tree, tensors: dict, path: str = "s"):
    """`tree` as JSON-able data, its tensors moved into `tensors` (key -> tensor)."""
    if isinstance(tree, torch.Tensor):
        tensors[path] = tree.detach().contiguous().cpu()
        return {"$tensor": path}
    if isinstance(tree, float) and not math.isfinite(tree):
        return {"$float": repr(tree)}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, tuple):
        return {"$tuple": [pack(v, tensors, f"{path}.{i}") for i, v in enumerate(tree)]}
    if isinstance(tree, list):
        return [pack(v, tensors, f"{path}.{i}") for i, v in enumerate(tree)]
    if isinstance(tree, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in tree):
            return {k: pack(v, tensors, f"{path}.{k}") for k, v in tree.items()}
        return {"$items": [[pack(k, tensors, f"{path}.k{i}"), pack(v, tensors, f"{path}.{i}")]
                           for i, (k, v) in enumerate(tree.items())]}
    raise TypeError(f"train state at {path}: {type(tree).__name__} cannot be stored; expected "
                    "tensors, numbers, strings, None and lists, tuples and dicts of them")


def unpack(tree, tensors: dict):
    """The inverse of `pack`."""
    if isinstance(tree, list):
        return [unpack(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    tag = next((t for t in _TAGS if t in tree), None)
    if tag is None:
        return {k: unpack(v, tensors) for k, v in tree.items()}
    value = tree[tag]
    if tag == "$tensor":
        if value not in tensors:
            raise CheckpointError(f"train state refers to tensor {value!r}, which {TENSORS} "
                                  "does not hold")
        return tensors[value]
    if tag == "$float":
        return float(value)
    if tag == "$tuple":
        return tuple(unpack(v, tensors) for v in value)
    return {unpack(k, tensors): unpack(v, tensors) for k, v in value}


def state_files(state: dict) -> dict[str, bytes]:
    """A train state as the bytes of its two files, by name."""
    from safetensors.torch import save
    tensors: dict = {}
    scalars = pack(state, tensors)
    return {TENSORS: save(tensors), SCALARS: json_bytes(scalars)}


def _read_current(directory: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(directory / TENSORS))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(directory / TENSORS)!r} cannot be read ({e}); the "
                              "checkpoint is corrupt") from None
    try:
        scalars = json.loads((directory / SCALARS).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{str(directory / SCALARS)!r} cannot be read ({e}); the "
                              "checkpoint is corrupt") from None
    return unpack(scalars, tensors)


def _read_legacy(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"{str(path)!r} was refused: it is not a pickle of tensors and plain data alone "
            f"(torch's weights-only loader says: {reason}). sqt never runs code from a "
            "checkpoint; a file written by sqt holds nothing else, so this one was altered or "
            "is not sqt's") from None
    except Exception as e:  # truncated or garbled files raise several types
        raise CheckpointError(f"{str(path)!r} cannot be read ({type(e).__name__}); the "
                              "checkpoint is corrupt") from None


def check_state(state, where: str) -> dict:
    """A train state with every REQUIRED field, of its type; a CheckpointError names what is
    missing or wrong."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} holds a {type(state).__name__}: expected a train state "
                              f"(a mapping with {', '.join(REQUIRED)})")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)}: expected a train state with "
                              f"{', '.join(REQUIRED)}; the checkpoint is incomplete or not sqt's")
    for key, kind in REQUIRED.items():
        value = state[key]
        ok = isinstance(value, kind) and not isinstance(value, bool) or (
            kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise CheckpointError(f"{where}: {key} is a {type(value).__name__}: expected "
                                  f"{kind.__name__}")
    if state["step"] < 0 or state["loss_n"] < 0 or len(state["best"]) != 2:
        raise CheckpointError(f"{where}: step={state['step']}, loss_n={state['loss_n']}, "
                              f"best={state['best']!r}: expected counts >= 0 and best = "
                              "[loss, step]")
    if state["rng_cpu"].dtype != torch.uint8:
        raise CheckpointError(f"{where}: rng_cpu has dtype {state['rng_cpu'].dtype}: expected "
                              "torch.uint8")
    return state


def read_state(directory) -> Optional[dict]:
    """The train state in a checkpoint directory (its two files, or an older run's
    train_state.pt), checked; None when it has none."""
    directory = Path(directory)
    if all((directory / name).is_file() for name in FILES):
        return check_state(_read_current(directory), f"the train state in {str(directory)!r}")
    if (directory / LEGACY).is_file():
        return check_state(_read_legacy(directory / LEGACY), repr(str(directory / LEGACY)))
    if any((directory / name).is_file() for name in FILES):
        raise CheckpointError(f"{str(directory)!r} has only one of {' and '.join(FILES)}: the "
                              "train state is incomplete")
    return None
