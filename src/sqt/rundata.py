"""The text a trained model is probed, converted and fine-tuned on: the dataset its run recorded
(or one named), checked against the model's tokenizer, and token windows drawn from a split."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .windows import EVAL_SEED

CORPUS_SEED = EVAL_SEED + 1
"""Seed of the training-split windows a conversion averages over: other windows than the
validation ones a conversion is then scored on."""


def check_count(name: str, value, minimum: int, *, optional: bool = False) -> None:
    """A ValueError unless `value` is an integer >= `minimum` (or None, when `optional`)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected {'None or ' if optional else ''}an integer "
                         f">= {minimum}")


def recorded_data(run, meta: dict) -> str:
    """The data spec a run was trained on: what a conversion recorded, its config.toml's `data`,
    else the prepared directory or bundled corpus its checkpoint describes. A ValueError when it
    records none of them."""
    from .runconfig import read_run_file
    run = Path(run)
    converted = (meta.get("conversion") or {}).get("data")
    if not converted and (run / "conversion.json").is_file():   # a fine-tuned conversion
        converted = json.loads((run / "conversion.json").read_text()).get("data")
    if converted:
        return converted
    for toml in (run / "config.toml", run.parent / "config.toml"):
        if toml.is_file():
            spec = read_run_file(toml).get("data")
            if spec:
                return spec
    described = meta.get("dataset") or {}
    if described.get("path"):
        return described["path"]
    if described.get("name") == "tinyshakespeare":
        return "tinyshakespeare"
    raise ValueError(f"{str(run)!r} records no dataset this tool can open (no config.toml with "
                     "`data`, no prepared dataset path in its checkpoint): give --data")


def open_data(run, meta: dict, model, data: Optional[str] = None):
    """(spec, dataset) for a model from `run`: `data` when given, else what the run recorded.
    The dataset's tokenizer must be the model's (when the run has one) and fit its vocabulary."""
    from .checkpoint import load_run_tokenizer
    from .data import load_dataset
    spec = data or recorded_data(run, meta)
    dataset = load_dataset(spec)
    mine = load_run_tokenizer(run)
    if mine is not None and mine.sha256 != dataset.tokenizer.sha256:
        raise ValueError(f"data {spec!r} is tokenized with another tokenizer than {str(run)!r}'s "
                         f"(sha256 {dataset.tokenizer.sha256[:12]} vs {mine.sha256[:12]}): give "
                         "--data with text prepared by the model's tokenizer")
    if dataset.tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"data {spec!r} has {dataset.tokenizer.vocab_size} token ids but the "
                         f"model's vocab_size is {model.config.vocab_size}")
    return spec, dataset


def default_seq_len(model, meta: dict) -> int:
    """The run's training window, else the model's context up to 1024."""
    trained = (meta.get("train") or {}).get("seq_len")
    return trained if isinstance(trained, int) else min(model.config.max_seq_len, 1024)


def token_windows(split, n_tokens: int, seq_len: int, *, seed: int = EVAL_SEED) -> torch.Tensor:
    """ceil(n_tokens / seq_len) windows (at least 2) of seq_len + 1 tokens at random offsets of
    `split` (an array or memmap of ids; only the windows are read), as an (N, seq_len + 1) int64
    tensor: inputs [:, :-1], targets [:, 1:]."""
    from .data import gather_windows
    for name, value in (("tokens", n_tokens), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"{name}={value!r}: expected an integer >= 2")
    tokens = np.asarray(split) if isinstance(split, (list, tuple)) else split
    if len(tokens) < seq_len + 2:
        raise ValueError(f"seq_len={seq_len}: the split has only {len(tokens)} tokens")
    n = max(2, math.ceil(n_tokens / seq_len))
    starts = np.random.default_rng(seed).integers(0, len(tokens) - seq_len, n)
    return torch.from_numpy(gather_windows(tokens, starts, seq_len))
