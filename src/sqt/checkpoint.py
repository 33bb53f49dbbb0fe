"""Checkpoints and run directories; nothing lost, nothing executed.

A checkpoint directory is a model directory (config.json, model.safetensors, tokenizer.json) plus
the train state (train_state.safetensors + train_state.json: no pickle) and a manifest of every
file's size and sha256, written last. It is written as one set (sqt.fileset): beside it, fsynced,
then renamed into place, so it is complete or absent, and a file changed afterwards is an error.

A run directory (`sqt train --out-dir RUN`) holds run-level files (config.toml, curves.jsonl,
result.json) and its checkpoint in `RUN/checkpoint/`. `RunDirectory.claim` locks it for one
training process at a time and refuses to replace a run unless asked (resume or overwrite).

Readers accept a run directory, a checkpoint or model directory, and older runs whose files
stand at the top of the run directory (the tokenizer then a dict in config.json)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator, Optional

from .fileset import aside, pending, point, recover, settled, write_set
from .model import TransformerLM
from .modeldir import (CHECKPOINT_DIR, CHECKPOINT_FILES, CONFIG, LEGACY_TRAIN_STATE as LEGACY_STATE,
                       TOKENIZER, WEIGHTS, CheckpointError, find_model_dir, load, model_files,
                       read_config as _read_config)
from .trainstate import read_state, state_files
from .utils import atomic_write_bytes

try:
    import fcntl
except ImportError:   # not POSIX: runs are not locked
    fcntl = None

__all__ = ["CHECKPOINT_DIR", "CheckpointError", "RunDirectory", "load_model", "load_run_tokenizer",
           "load_train_state", "read_config", "resolve", "save_model"]

RUN_FILES = ("config.toml", "curves.jsonl", "result.json")
LOCK = ".lock"


def resolve(path) -> Path:
    """The checkpoint (or model) directory that `path` names: a run directory's checkpoint, the
    directory itself, or an older run's top level."""
    return find_model_dir(path)


def save_model(directory, model: TransformerLM, *, tokenizer=None, meta: Optional[dict] = None,
               train_state: Optional[dict] = None, state_dict: Optional[dict] = None) -> Path:
    """Write `directory` as one checkpoint: the model directory (config.json with `meta` beside
    the model config, model.safetensors, tokenizer.json when a tokenizer is given), the train
    state when given, and the manifest, all or nothing. An existing checkpoint there is replaced;
    a directory holding other files is refused. `state_dict`: the weights to write instead of
    `model.state_dict()` (a sharded model's, gathered whole)."""
    model = getattr(model, "_orig_mod", model)   # torch.compile's wrapper prefixes every name
    if not isinstance(model, TransformerLM):
        raise ValueError(f"model is a {type(model).__name__}: expected an sqt TransformerLM")
    weights = model.state_dict() if state_dict is None else state_dict
    files = model_files(model.config, weights, tokenizer=tokenizer, meta=meta)
    if train_state is not None:
        files.update(state_files(train_state))
    return write_set(directory, files, replaceable=CHECKPOINT_FILES,
                     manifest={"step": (meta or {}).get("step")})


def read_config(path) -> dict:
    """config.json of the checkpoint at `path` (any form `resolve` accepts)."""
    return _read_config(resolve(path))


def load_model(path, device="cpu") -> tuple[TransformerLM, dict]:
    """The model (in eval mode) and the config.json metadata of the checkpoint at `path`."""
    return load(TransformerLM, path, device)


def load_run_tokenizer(path):
    """The tokenizer of the checkpoint at `path`: its tokenizer.json, or the character
    tokenizer an older run kept in config.json; None when it has neither."""
    from .tokenizer import load_tokenizer
    directory = resolve(path)
    meta = _read_config(directory)
    spec = directory / TOKENIZER if (directory / TOKENIZER).is_file() else meta.get("tokenizer")
    if spec is None:
        return None
    try:
        tok = load_tokenizer(spec)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{str(directory)!r}: unreadable tokenizer: {e}") from None
    vocab = meta["model"].get("vocab_size")
    if isinstance(vocab, int) and tok.vocab_size > vocab:
        raise CheckpointError(f"{str(directory)!r}: the tokenizer has {tok.vocab_size} tokens "
                              f"but the model's vocab_size is {vocab}")
    return tok


def load_train_state(path) -> Optional[dict]:
    """The checked train state of the checkpoint at `path`, or None when it has none."""
    return read_state(resolve(path))


class RunDirectory:
    """`sqt train --out-dir PATH`: the run-level files and the checkpoint directory. Every write
    happens while `claim` holds the directory."""

    def __init__(self, path):
        self.path = Path(path)
        self.checkpoint_path = self.path / CHECKPOINT_DIR
        self._lock_fd: Optional[int] = None

    # -- what is there --------------------------------------------------------------------------

    def checkpoint(self) -> Optional[Path]:
        """The complete checkpoint to resume from: `checkpoint/` (or the previous one a killed
        save kept aside), else an older run's files at the top; None when there is none."""
        found = settled(self.checkpoint_path)
        if found is not None:
            return found
        return self.path if (self.path / CONFIG).is_file() else None

    def existing(self) -> list[str]:
        """What a new run would replace: run files, checkpoints (finished or not)."""
        names = [n for n in RUN_FILES + (CONFIG, WEIGHTS, LEGACY_STATE)
                 if (self.path / n).exists()]
        kept = [self.checkpoint_path, aside(self.checkpoint_path)]
        names += [p.name + "/" for p in kept + pending(self.checkpoint_path) if p.exists()]
        return names

    def check(self, *, resume: bool, overwrite: bool) -> None:
        """Refuse what `claim` would refuse, without taking the directory: a run already there,
        neither resumed nor overwritten; a path that is a file; both resume and overwrite."""
        if resume and overwrite:
            raise ValueError("resume=True and overwrite=True: expected at most one (resume "
                             "continues the run in out_dir, overwrite starts it again)")
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"out_dir={str(self.path)!r} is a file: expected a directory")
        found = self.existing() if self.path.is_dir() else []
        if found and not (resume or overwrite):
            raise CheckpointError(
                f"out_dir={str(self.path)!r} already holds a run ({', '.join(found)}): "
                "resume it (--resume), replace it (--overwrite) or choose another out_dir")

    # -- holding it -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def claim(self, *, resume: bool, overwrite: bool) -> Iterator["RunDirectory"]:
        """Hold the directory for one training process: lock it (a second process is refused;
        the lock dies with its process, so a killed run never blocks the next), finish a save a
        kill interrupted, then refuse to replace a run unless `resume` (continue it) or
        `overwrite` (delete its files and start again)."""
        self.check(resume=resume, overwrite=overwrite)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"out_dir={str(self.path)!r} cannot be created ({e.strerror})") \
                from None
        self._lock()
        try:
            recover(self.checkpoint_path)
            self.check(resume=resume, overwrite=overwrite)   # again, now that it is ours
            if overwrite and self.existing():
                self._clear()
            yield self
        finally:
            self._unlock()

    def _lock(self) -> None:
        if fcntl is None:
            return
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(
                f"out_dir={str(self.path)!r} is in use: another process (pid {holder}) is "
                "training into it; wait for it to end or choose another out_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)   # closing releases the lock; the file stays, harmless
            self._lock_fd = None

    def _clear(self) -> None:
        for name in RUN_FILES + (CONFIG, WEIGHTS, LEGACY_STATE):
            (self.path / name).unlink(missing_ok=True)
        for path in [self.checkpoint_path, aside(self.checkpoint_path)] + pending(
                self.checkpoint_path):
            shutil.rmtree(path, ignore_errors=True)
        print(f"note: out_dir={str(self.path)!r}: the previous run's files were deleted "
              "(overwrite)", file=sys.stderr)

    # -- writing --------------------------------------------------------------------------------

    def write(self, name: str, data: bytes) -> None:
        """A run-level file, atomically."""
        point(f"writing {name}")
        atomic_write_bytes(self.path / name, data)

    def save(self, model: TransformerLM, *, tokenizer, meta: dict, train_state: dict,
             state_dict: Optional[dict] = None) -> Path:
        """Swap in a new checkpoint (`state_dict`: see save_model). An older run's files at the
        top are removed once the new checkpoint stands, so readers never prefer stale files."""
        saved = save_model(self.checkpoint_path, model, tokenizer=tokenizer, meta=meta,
                           train_state=train_state, state_dict=state_dict)
        for name in (LEGACY_STATE, WEIGHTS, CONFIG):
            if (self.path / name).exists():
                point(f"removing the older layout's {name}")
                (self.path / name).unlink()
        return saved
