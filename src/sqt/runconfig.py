"""A run's configuration: TrainConfig (budget, batch, optimizer, evaluation, device and output
settings), the one builder of a preset's model and training recipe, and the TOML file a run is
described by (`preset`, `data`, `[model]`, `[train]`), read and written."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, as a package (a dependency on 3.10)
    import tomli as tomllib

from .config import PRESETS, LMConfig, preset, recipe_settings
from .utils import check_device_name, resolve_device

DTYPE_NAMES = ("auto", "float32", "bfloat16")
BUDGETS = ("steps", "tokens", "epochs")
DEFAULT_STEPS = 2000
DEFAULT_PRESET = "small"
DEFAULT_DATA = "tinyshakespeare"


@dataclass
class TrainConfig:
    """How one model is trained. The budget is one of steps, tokens and epochs (none given:
    2000 steps); `resolve` turns it into steps once the training split is known."""

    steps: Optional[int] = field(default=None, metadata={
        "help": "optimizer steps: the budget, or tokens or epochs instead"})
    tokens: Optional[int] = field(default=None, metadata={
        "help": "budget in training tokens, rounded up to whole steps of batch_size x seq_len"})
    epochs: Optional[float] = field(default=None, metadata={
        "help": "budget in passes over the training split's tokens, rounded up to whole steps"})
    batch_size: int = field(default=64, metadata={
        "help": "sequences per optimizer step, drawn at once and split into grad_accum "
                "micro-batches"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step: the same update as one batch in less memory; "
                "must divide batch_size"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training window"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate, reached after warmup"})
    min_lr: Optional[float] = field(default=None, metadata={
        "help": "learning rate at the last step, where the cosine ends (None: lr / 10)"})
    warmup: int = field(default=100, metadata={"help": "steps of linear learning-rate warm-up"})
    weight_decay: float = field(default=0.1, metadata={
        "help": "AdamW weight decay on matmul weights (never on norms, biases, embeddings or "
                "static query tables)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.99, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={
        "help": "clip the global gradient norm to this (0: no clipping)"})
    eval_every: Optional[int] = field(default=None, metadata={
        "help": "steps between evaluations (None: an eighth of the run)"})
    eval_batches: int = field(default=20, metadata={
        "help": "validation batches per evaluation, of batch_size windows each: the same windows "
                "at every evaluation and for every run with the same batch_size and seq_len"})
    seed: int = field(default=0, metadata={
        "help": "seed of the initial weights, the training windows and dropout"})
    device: str = field(default="auto", metadata={
        "help": "auto (CUDA when available), cpu, cuda or cuda:N"})
    compile: Optional[bool] = field(default=None, metadata={
        "help": "torch.compile the forward and loss (None: on CUDA only)"})
    compile_mode: Optional[str] = field(default=None, metadata={
        "help": "torch.compile mode, e.g. reduce-overhead (None: torch's default)"})
    cuda_graph: Optional[bool] = field(default=None, metadata={
        "help": "capture the whole step as one CUDA graph and replay it (None: on CUDA)"})
    data_on_device: Optional[bool] = field(default=None, metadata={
        "help": "true: upload the training split and gather windows on the device; false: "
                "gather them on the host from where the split is (a prepared dataset's memmap) "
                "and copy each batch over while the step before runs. The same batches either "
                "way (None: upload when the split's int64 tokens take at most a tenth of the "
                "free device memory, or of the free RAM on the CPU)"})
    dtype: str = field(default="auto", metadata={
        "help": "autocast dtype: auto (bfloat16 on CUDA, float32 on the CPU), float32 or "
                "bfloat16"})
    fsdp: bool = field(default=False, metadata={
        "help": "under torchrun: shard every block's weights, gradients and optimizer state "
                "across the processes (FSDP2) instead of a whole copy per process (DDP); alone, "
                "nothing to shard"})
    out_dir: Optional[str] = field(default=None, metadata={
        "help": "run directory for the checkpoint, curves.jsonl and result.json (None: keep "
                "nothing); one that already holds a run is refused unless resumed or overwritten"})
    overwrite: bool = field(default=False, metadata={
        "help": "when out_dir already holds a run, delete its checkpoint, curves and result and "
                "train from scratch"})
    checkpoint_every: int = field(default=0, metadata={
        "help": "steps between checkpoints in out_dir (0: only the final one)"})
    progress: Optional[bool] = field(default=None, metadata={
        "help": "a progress bar on stderr (None: when stderr is a terminal)"})
    log: Optional[bool] = field(default=None, metadata={
        "help": "one JSON line per evaluation on stdout (None: when stderr is not a terminal)"})

    def __post_init__(self):
        ints = {"steps": 1, "tokens": 1, "batch_size": 1, "grad_accum": 1, "seq_len": 1,
                "warmup": 0, "eval_every": 1, "eval_batches": 1, "seed": 0, "checkpoint_every": 0}
        for name, lo in ints.items():
            v = getattr(self, name)
            if v is None and name in ("steps", "tokens", "eval_every"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}={v!r}: expected an integer >= {lo}")
        given = [k for k in BUDGETS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(", ".join(f"{k}={getattr(self, k)!r}" for k in given)
                             + ": expected one budget, of steps, tokens or epochs")
        if self.epochs is not None and not _positive_number(self.epochs):
            raise ValueError(f"epochs={self.epochs!r}: expected a finite number > 0")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum={self.grad_accum}: expected a divisor of "
                             f"batch_size={self.batch_size}")
        for name in ("lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not (_positive_number(v) or (name != "lr" and v == 0)):
                bound = "> 0" if name == "lr" else ">= 0"
                raise ValueError(f"{name}={v!r}: expected a finite number {bound}")
        if self.min_lr is not None and (isinstance(self.min_lr, bool) or not isinstance(
                self.min_lr, (int, float)) or not 0 <= self.min_lr <= self.lr):
            raise ValueError(f"min_lr={self.min_lr!r}: expected None or a number in "
                             f"[0, lr={self.lr}]")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ValueError(f"{name}={v!r}: expected a number in [0, 1)")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
        check_device_name(self.device)
        for name in ("compile", "cuda_graph", "progress", "log", "overwrite", "fsdp"):
            v = getattr(self, name)
            optional = name not in ("overwrite", "fsdp")
            if not (isinstance(v, bool) or (v is None and optional)):
                raise ValueError(f"{name}={v!r}: expected True or False"
                                 + (" or None" if optional else ""))
        check_compile_mode(self.compile_mode)
        if self.out_dir is not None and (not isinstance(self.out_dir, (str, os.PathLike))
                                         or str(self.out_dir) == ""):
            raise ValueError(f"out_dir={self.out_dir!r}: expected a path or None")
        if self.seed >= 2 ** 63:
            raise ValueError(f"seed={self.seed}: expected an integer in [0, 2**63)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def final_min_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum

    def resolve(self, train_tokens: int) -> "TrainConfig":
        """This config with its budget as `steps` and `eval_every` set; `train_tokens` is the
        training split's size, what an epoch is measured against."""
        per_step = self.batch_size * self.seq_len
        if self.tokens is not None:
            steps = math.ceil(self.tokens / per_step)
        elif self.epochs is not None:
            steps = max(1, math.ceil(self.epochs * train_tokens / per_step))
        else:
            steps = self.steps or DEFAULT_STEPS
        return dataclasses.replace(self, steps=steps, tokens=None, epochs=None,
                                   eval_every=self.eval_every or max(1, steps // 8))

    def budget(self, train_tokens: int) -> dict:
        """What the run was asked for and what that resolves to, for its record."""
        steps = self.resolve(train_tokens).steps
        per_step = self.batch_size * self.seq_len
        asked = {k: getattr(self, k) for k in BUDGETS if getattr(self, k) is not None}
        return {"asked": asked or {"steps": steps}, "steps": steps, "tokens_per_step": per_step,
                "tokens": steps * per_step, "epochs": steps * per_step / train_tokens}


def _positive_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v < math.inf


def check_compile_mode(mode) -> None:
    """A ValueError unless `mode` is None or one of torch.compile's modes (asked of torch, so a
    newer torch's modes are accepted)."""
    if mode is None:
        return
    from torch._inductor import list_mode_options
    known = ["default", *(m for m in list_mode_options() if m != "default")]
    if mode not in known:
        raise ValueError(f"compile_mode={mode!r}: expected None or one of {', '.join(known)}")


# Fields that may differ between a run and its resumption without changing the result.
RESUME_FREE = ("device", "compile", "compile_mode", "cuda_graph", "data_on_device", "fsdp",
               "out_dir", "checkpoint_every", "progress", "log", "overwrite")
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(LMConfig))
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def recipe(preset_name: str, *, device_type: Optional[str] = None,
           **overrides) -> tuple[LMConfig, TrainConfig]:
    """The model of preset `preset_name` and its training recipe (config.RECIPES) on a device type
    (None: that of the `device` setting), with `overrides` on top: any LMConfig or TrainConfig
    field (vocab_size: the dataset's); None means "keep the recipe's". A budget override (steps,
    tokens or epochs) replaces the recipe's. Unless overridden, max_seq_len grows to seq_len. The
    one way `sqt train` and the sweeps build a run."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - set(MODEL_FIELDS) - set(TRAIN_FIELDS))
    if unknown:
        raise ValueError(f"setting {unknown[0]!r}: expected a field of LMConfig "
                         f"({', '.join(MODEL_FIELDS)}) or TrainConfig ({', '.join(TRAIN_FIELDS)})")
    if preset_name not in PRESETS:
        raise ValueError(f"preset {preset_name!r}: expected one of {', '.join(PRESETS)}")
    if device_type is None:
        device_type = resolve_device(overrides.get("device", "auto")).type
    settings = recipe_settings(preset_name, device_type)
    if any(k in overrides for k in BUDGETS):
        settings = {k: v for k, v in settings.items() if k not in BUDGETS}
    settings.update(overrides)
    model = {k: v for k, v in settings.items() if k in MODEL_FIELDS}
    train_cfg = TrainConfig(**{k: v for k, v in settings.items() if k in TRAIN_FIELDS})
    model.setdefault("max_seq_len", max(train_cfg.seq_len, PRESETS[preset_name]["max_seq_len"]))
    return preset(preset_name, **model), train_cfg


# A run's TOML file. Top level: `preset` and `data`; sections [model] (LMConfig fields) and [train]
# (TrainConfig fields). Settings combine as preset < file < command-line flags.
SECTIONS = {"model": LMConfig, "train": TrainConfig}
TOP_LEVEL = ("preset", "data")
NOT_WRITTEN = ("out_dir", "progress", "log", "overwrite")
"""Left out of a written run file: how a run shows itself and where it writes, not what it is (a
file that named its own directory would train over the run it came from)."""
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          tuple: "a list of strings"}


def _accepts(hint, value) -> bool:
    if typing.get_origin(hint) is Union or type(hint).__name__ == "UnionType":
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool or value is True or value is False:
        return hint is bool and isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float))
    if hint is tuple or typing.get_origin(hint) is tuple:
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    return isinstance(value, hint) if isinstance(hint, type) else True


def check_setting(cls, name: str, value, where: str = "") -> None:
    """A ValueError unless `name` is a field of `cls` (LMConfig or TrainConfig) and `value` has
    its type. Ranges and cross-field rules are the dataclass's to check."""
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise ValueError(f"{where}unknown key {name!r}: expected one of {', '.join(hints)}")
    if not _accepts(hints[name], value):
        kinds = [_KINDS[h] for h in typing.get_args(hints[name]) or (hints[name],) if h in _KINDS]
        raise ValueError(f"{where}{name}={value!r}: expected {' or '.join(kinds) or 'another type'}")


def read_run_file(path) -> dict:
    """A run file as {"preset": ..., "data": ..., "settings": {field: value}} (absent keys left
    out), every key and type checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} "
                                f"{'is a directory' if path.is_dir() else 'does not exist'}: "
                                "expected a TOML file")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    out, settings = {}, {}
    for key, value in doc.items():
        if key in SECTIONS and isinstance(value, dict):
            for name, v in value.items():
                check_setting(SECTIONS[key], name, v, f"{path} [{key}] ")
                settings[name] = tuple(v) if isinstance(v, list) else v
        elif key in TOP_LEVEL and isinstance(value, str):
            out[key] = value
        elif key in TOP_LEVEL or key in SECTIONS:
            wanted = "a string" if key in TOP_LEVEL else f"a [{key}] table"
            raise ValueError(f"{path}: {key}={value!r}: expected {wanted}")
        else:
            raise ValueError(f"{path}: unknown key {key!r}: expected top-level "
                             f"{' and '.join(TOP_LEVEL)} (strings) and sections "
                             f"{', '.join(f'[{s}]' for s in SECTIONS)}")
    given = [k for k in BUDGETS if k in settings]
    if len(given) > 1:
        raise ValueError(f"{path} [train]: {', '.join(given)}: expected one budget, of steps, "
                         "tokens or epochs")
    return {**out, "settings": settings}


def merge_settings(*layers: dict) -> dict:
    """Field settings, each layer over the ones before it; a layer that names a budget (steps,
    tokens or epochs) replaces the budget of the layers below. None means "not set"."""
    merged: dict = {}
    for layer in layers:
        layer = {k: v for k, v in layer.items() if v is not None}
        if any(k in layer for k in BUDGETS):
            merged = {k: v for k, v in merged.items() if k not in BUDGETS}
        merged.update(layer)
    return merged


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)   # a float's repr reads back as the same float, in TOML too
    if isinstance(v, str):
        # JSON's string escapes are TOML's; DEL is a control character to TOML, not to JSON.
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"


def run_file_text(*, preset_name: str, data: str, model: LMConfig, train: TrainConfig,
                  budget: Optional[dict] = None) -> str:
    """A resolved run as a run file: `sqt train --config FILE` with the same data trains the same
    run. None values are left out (TOML has no null, and None is each such field's default)."""
    lines = ["# sqt train: the resolved configuration (preset < config file < flags)."]
    if budget and set(budget["asked"]) != {"steps"}:
        asked = ", ".join(f"{k} = {v!r}" for k, v in budget["asked"].items())
        lines.append(f"# budget asked: {asked}, resolved to {budget['steps']} steps")
    lines += [f"preset = {_toml_value(preset_name)}", f"data = {_toml_value(data)}"]
    for section, values in (("model", model.to_dict()), ("train", train.to_dict())):
        lines += ["", f"[{section}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()
                  if v is not None and k not in NOT_WRITTEN]
    return "\n".join(lines) + "\n"
