"""Before a run trains: what it refuses (settings that do not fit the data or the device, a run
directory not to replace), and where it starts from: the checkpoint in its run directory when it
resumes (the check that it is the same run, its state restored exactly: weights, optimizer,
counters, RNG states; the record of a run that had already finished, handed back without
rewriting it), or given initial weights (a converted or pretrained model of the same shape)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import CheckpointError, RunDirectory, load_model, load_train_state, read_config
from .config import LMConfig
from .runconfig import RESUME_FREE, TrainConfig
from .utils import resolve_device


# LMConfig fields that change how a model trains or runs, not the function its weights compute.
NOT_FUNCTION = ("dropout", "checkpoint_blocks", "backend", "moe_impl")


def initial_weights(init_from, model_cfg: LMConfig) -> dict:
    """The state dict a run starts from: `init_from` itself, or the model of a checkpoint
    directory, which must be the model this run trains."""
    if isinstance(init_from, dict):
        return init_from
    model, _ = load_model(init_from)
    mine, theirs = ({k: v for k, v in c.to_dict().items() if k not in NOT_FUNCTION}
                    for c in (model_cfg, model.config))
    if mine != theirs:
        diff = ", ".join(f"{k} ({theirs[k]!r} there, {mine[k]!r} here)"
                         for k in mine if mine[k] != theirs.get(k))
        raise ValueError(f"init_from={str(init_from)!r} holds another model: {diff}")
    return model.state_dict()


def curves_bytes(curves: list) -> bytes:
    """curves.jsonl: one evaluation a line."""
    return "".join(json.dumps(c) + "\n" for c in curves).encode()


def check_resumable(saved: dict, model_cfg: LMConfig, cfg: TrainConfig, path: Path,
                    dataset: dict) -> None:
    """A CheckpointError unless the checkpoint's config.json describes this run: the same model,
    the same data (`dataset`: its description), and the same training settings but for those
    that do not change the result (RESUME_FREE)."""
    # Block checkpointing changes memory, not the function: a run may resume with it on or off.
    def function(d: dict) -> dict:
        return {k: v for k, v in {**LMConfig().to_dict(), **d}.items() if k != "checkpoint_blocks"}
    train = saved.get("train", {})
    if not isinstance(train, dict):
        raise CheckpointError(f"{str(path)!r}: config.json's train={train!r}: expected an object "
                              "of TrainConfig fields")
    was, now = function(saved["model"]), function(model_cfg.to_dict())
    diff = [k for k in now if was.get(k) != now[k]]
    if diff:
        raise CheckpointError(
            f"cannot resume from {str(path)!r}: model config differs in "
            + ", ".join(f"{k} (checkpoint {was.get(k)!r}, now {now[k]!r})" for k in diff))
    data = saved.get("dataset")
    for key in ("sha256", "tokenizer_sha256"):
        if isinstance(data, dict) and isinstance(data.get(key), str) and dataset.get(key) \
                and data[key] != dataset[key]:
            raise CheckpointError(
                f"cannot resume from {str(path)!r}: it was trained on {data.get('name')!r} "
                f"({key} {data[key][:12]}...), this run's data is {dataset.get('name')!r} "
                f"({dataset[key][:12]}...)")
    old = {**TrainConfig().to_dict(), **train}   # fields added since: their defaults
    diff = [k for k, v in cfg.to_dict().items() if k not in RESUME_FREE and old.get(k) != v]
    if diff:
        raise CheckpointError(
            f"cannot resume from {str(path)!r}: train config differs in "
            + ", ".join(f"{k} (checkpoint {old.get(k)!r}, now {getattr(cfg, k)!r})" for k in diff))


def check_arguments(model_cfg, cfg, dataset) -> None:
    """A ValueError unless train's arguments are an LMConfig, a TrainConfig and a dataset."""
    for name, value, cls in (("model_cfg", model_cfg, LMConfig), ("cfg", cfg, TrainConfig)):
        if not isinstance(value, cls):
            raise ValueError(f"{name} is a {type(value).__name__}: expected a {cls.__name__}")
    if not all(hasattr(dataset, k) for k in ("tokenizer", "train", "val")):
        raise ValueError(f"dataset is a {type(dataset).__name__}: expected a dataset with "
                         "tokenizer, train and val (sqt.data.load_dataset)")


def check_run(model_cfg: LMConfig, cfg: TrainConfig, dataset, *, resume: bool = False,
              world_size: int = 1, directory: bool = True) -> None:
    """What `train` refuses before it starts, checked without reading the data or writing
    anything (a run directory's checkpoint config is read), so that a command line can refuse
    before it prints anything: settings that do not fit the data or the device, a run directory
    that is not to be replaced, a checkpoint of another run to resume. `world_size`: processes
    that share each batch; `directory` False: leave the run directory to rank 0."""
    check_arguments(model_cfg, cfg, dataset)
    if model_cfg.vocab_size != dataset.tokenizer.vocab_size:
        raise ValueError(f"vocab_size={model_cfg.vocab_size} but the dataset's tokenizer has "
                         f"{dataset.tokenizer.vocab_size} symbols; set vocab_size to match")
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len="
                         f"{model_cfg.max_seq_len}")
    if resume and not cfg.out_dir:
        raise ValueError("resume=True needs out_dir: the directory holding the checkpoint")
    if cfg.batch_size % (world_size * cfg.grad_accum):
        raise ValueError(f"batch_size={cfg.batch_size}: expected a multiple of world_size x "
                         f"grad_accum = {world_size} x {cfg.grad_accum} (each of {world_size} "
                         f"processes takes an equal share in {cfg.grad_accum} micro-batches)")
    device = resolve_device(cfg.device)
    if cfg.cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True on device {str(device)!r}: CUDA graphs need a CUDA "
                         "device")
    for split in ("train", "val"):
        n = len(getattr(dataset, split))
        if n <= cfg.seq_len + 1:
            raise ValueError(f"seq_len={cfg.seq_len}: the {split} split of "
                             f"{dataset.describe().get('name')!r} has only {n} tokens; expected "
                             "more than seq_len + 1")
    if cfg.out_dir and directory:
        check_directory(model_cfg, cfg, dataset, resume=resume)


def check_directory(model_cfg: LMConfig, cfg: TrainConfig, dataset, *, resume: bool) -> None:
    """check_run's part about `cfg.out_dir`: a run there to replace, a checkpoint to resume."""
    run = RunDirectory(cfg.out_dir)
    run.check(resume=resume, overwrite=cfg.overwrite)
    if resume and run.checkpoint() is not None:
        check_resumable(read_config(run.checkpoint()), model_cfg, cfg.resolve(len(dataset.train)),
                        run.checkpoint(), dataset.describe())


def _load_whole(model, opt, weights: dict, optimizer: dict) -> None:
    model.load_state_dict(weights)
    opt.load_state_dict(optimizer)


def restore(run: RunDirectory, model, opt, cfg: TrainConfig, device: torch.device,
            dataset: dict, *, load=_load_whole, rank: int = 0) -> Optional[dict]:
    """Load the run's checkpoint into `model` and `opt` and the RNG states, and return its train
    state; None (and a note) when the run has no checkpoint yet. `dataset`: this run's data, as
    its describe() tells it. `load(model, opt, weights, optimizer_state)` puts the checkpoint's
    full state dicts in (a sharded model keeps its shard: sqt.distributed); `rank`: this
    process's rank, whose own RNG states are restored when the checkpoint kept them."""
    where = run.checkpoint()
    if where is None:
        print(f"note: no checkpoint in {str(run.path)!r} yet; starting from step 0",
              file=sys.stderr)
        return None
    check_resumable(read_config(where), model.config, cfg, where, dataset)
    loaded, meta = load_model(where)          # checks the manifest of every file first
    state = load_train_state(where)
    if state is None:
        raise CheckpointError(f"{str(where)!r} holds a model but no train state: it was not "
                              "written by a training run, so there is nothing to resume")
    if meta.get("step", state["step"]) != state["step"]:
        raise CheckpointError(f"{str(where)!r}: config.json is of step {meta.get('step')!r} but "
                              f"the train state of step {state['step']}: files of two "
                              "checkpoints are mixed")
    try:
        load(model, opt, loaded.state_dict(), state["optimizer"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{str(where)!r}: the optimizer state does not fit this model "
                              f"({type(e).__name__}: {e})") from None
    # Rank r > 0 of a run of several processes finds its own states under rng_ranks[r - 1]; a
    # rank the checkpoint has none for (more processes than before) keeps the seed it started
    # with, which only dropout reads.
    rng = ((state["rng_cpu"], state.get("rng_cuda")) if rank == 0 else
           next(iter(state.get("rng_ranks", [])[rank - 1:rank]), None))
    try:
        if rng is not None:
            torch.set_rng_state(rng[0])
        if rng is not None and device.type == "cuda" and rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], device)
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"{str(where)!r}: the saved random-number state is not one "
                              f"({e})") from None
    return state


def finished(run: Optional[RunDirectory], state: dict, result: dict) -> dict:
    """A resumed run that had already finished: nothing is trained or rewritten. Its record is
    the one its last checkpoint keeps (an older run's result.json, or `result`, when it has
    none); a run-level file missing or out of step with the checkpoint (a kill between the last
    checkpoint and them) is written again. `run` None: a process that does not write (rank > 0
    of several), which returns the checkpoint's record or `result`."""
    if run is None:
        return state["result"] if isinstance(state.get("result"), dict) else result
    print(f"note: the run in {str(run.path)!r} finished at step {state['step']}; nothing to do",
          file=sys.stderr)
    record = state.get("result")
    if record is None and (run.path / "result.json").is_file():
        try:
            record = json.loads((run.path / "result.json").read_text())
        except ValueError:
            record = None
    record = record if isinstance(record, dict) else result
    if not (run.path / "result.json").is_file():
        run.write("result.json", (json.dumps(record, indent=2) + "\n").encode())
    curves = curves_bytes(state["curves"])
    path = run.path / "curves.jsonl"
    if not path.is_file() or path.read_bytes() != curves:
        run.write("curves.jsonl", curves)
    return record
