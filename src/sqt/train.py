"""The trainer: AdamW with warmup + cosine, gradient clipping, bf16 autocast on CUDA, optional
torch.compile, evaluation on fixed validation batches, learning curves, atomic checkpoints and an
exact `--resume`. Usable as `train(...)` from Python and as `python -m sqt.train`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, load_model, load_train_state, read_config, save_model
from .config import LMConfig, preset, PRESETS
from .flops import train_step_flops
from .model import TransformerLM
from .utils import atomic_write_bytes, run_record

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
EVAL_SEED = 1234
"""Validation batches are drawn with this seed whatever the run's seed, so every run (variant, size,
seed) is scored on the very same text."""


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64
    seq_len: int = 256
    lr: float = 1e-3
    min_lr: Optional[float] = None        # end of the cosine; None: lr / 10
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0                # 0 disables clipping
    eval_every: int = 250
    eval_batches: int = 20
    seed: int = 0
    device: str = "auto"                  # auto: cuda when available
    compile: Optional[bool] = None        # None: on for CUDA, off for CPU
    compile_mode: Optional[str] = None    # torch.compile mode: None (default), "reduce-overhead"...
    cuda_graph: Optional[bool] = None     # capture the whole step as one CUDA graph; None: on CUDA
    dtype: str = "auto"                   # autocast dtype; auto: bfloat16 on CUDA, float32 on CPU
    out_dir: Optional[str] = None         # checkpoints and curves.jsonl; None: keep nothing
    checkpoint_every: int = 0             # 0: only the final checkpoint (when out_dir is set)
    progress: Optional[bool] = None       # None: a bar when stderr is a terminal

    def __post_init__(self):
        ints = {"steps": 1, "batch_size": 1, "seq_len": 1, "warmup": 0, "eval_every": 1,
                "eval_batches": 1, "seed": 0, "checkpoint_every": 0}
        for name, lo in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}={v!r}: expected an integer >= {lo}")
        for name in ("lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or \
                    (name == "lr" and v == 0):
                bound = "> 0" if name == "lr" else ">= 0"
                raise ValueError(f"{name}={v!r}: expected a number {bound}")
        if self.min_lr is not None and not (0 <= self.min_lr <= self.lr):
            raise ValueError(f"min_lr={self.min_lr!r}: expected None or a number in "
                             f"[0, lr={self.lr}]")
        for name in ("beta1", "beta2"):
            if not (0 <= getattr(self, name) < 1):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a number in [0, 1)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device={self.device!r}: expected auto, cpu, cuda or cuda:N")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def final_min_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr


# Fields that may differ between a run and its resumption without changing the result.
RESUME_FREE = ("device", "compile", "compile_mode", "cuda_graph", "out_dir", "checkpoint_every",
               "progress")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine to `min_lr` at the last step. `step` counts from 0."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    lo = cfg.final_min_lr
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: CUDA is not available on this machine; use cpu")
    return device


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                   graphed: bool = False):
    """AdamW; weight decay only on matmul weights. Norms, biases, embeddings and static query
    tables/vectors (which are position embeddings by another name) are not decayed. A captured
    step needs the learning rate as a device tensor and a capturable optimizer."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        embedding_like = name.startswith(("tok_emb", "pos_emb")) or name.endswith(
            ("q_table", "q_vec"))
        (no_decay if p.dim() < 2 or embedding_like else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    lr = torch.tensor(cfg.lr, device=device) if graphed else cfg.lr
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda", capturable=graphed)


class Sampler:
    """Training windows as a pure function of (seed, step): the start offsets for steps
    k*CHUNK .. (k+1)*CHUNK-1 are drawn by a generator seeded with (seed, k). Resuming needs no
    sampler state, and the lookup is indexed by a step counter on the device, so the whole training
    step (batch included) can be captured once as a CUDA graph."""

    CHUNK = 512

    def __init__(self, data: torch.Tensor, batch_size: int, seq_len: int, seed: int):
        if data.numel() <= seq_len + 1:
            raise ValueError(f"seq_len={seq_len}: the training split has only {data.numel()} "
                             "tokens; expected more than seq_len + 1")
        self.data, self.B, self.T, self.seed = data, batch_size, seq_len, seed
        self.offsets = torch.arange(seq_len + 1, device=data.device)
        self.table = torch.empty(self.CHUNK, batch_size, dtype=torch.long, device=data.device)
        self.loaded = None

    def prepare(self, step: int) -> None:
        """Host side, before `step`: load the chunk of start offsets that holds it (in place, so a
        captured graph sees the new values)."""
        k = step // self.CHUNK
        if k != self.loaded:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
            starts = torch.randint(self.data.numel() - self.T - 1, (self.CHUNK, self.B),
                                   generator=gen)
            self.table.copy_(starts)
            self.loaded = k

    def batch(self, step: torch.Tensor):
        """(inputs, targets) for the step held in the 0-dim tensor `step`."""
        # index_select and take never read the index on the host, so this can be captured.
        start = self.table.index_select(0, (step % self.CHUNK).view(1))[0]
        chunk = torch.take(self.data, start[:, None] + self.offsets)
        return chunk[:, :-1], chunk[:, 1:]


def fixed_batches(data: torch.Tensor, n: int, batch_size: int, seq_len: int, device):
    if data.numel() <= seq_len + 1:
        raise ValueError(f"seq_len={seq_len}: the validation split has only {data.numel()} tokens; "
                         "expected more than seq_len + 1")
    gen = torch.Generator().manual_seed(EVAL_SEED)
    start = torch.randint(data.numel() - seq_len - 1, (n, batch_size), generator=gen)
    chunk = data[start[..., None] + torch.arange(seq_len + 1)].to(device)
    return chunk[..., :-1], chunk[..., 1:]


@torch.inference_mode()
def evaluate(model, xs, ys, autocast) -> tuple[float, float]:
    """Mean loss (nats/token) and next-token accuracy over the fixed batches, in eval mode."""
    was = model.training
    model.eval()
    loss = torch.zeros((), device=xs.device, dtype=torch.float64)
    correct = torch.zeros((), device=xs.device, dtype=torch.long)
    for x, y in zip(xs, ys):
        with autocast():
            logits = model(x)
        loss += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        correct += (logits.argmax(-1) == y).sum()
    model.train(was)
    n = ys.numel()
    return loss.item() / n, correct.item() / n


class _Progress:
    def __init__(self, total: int, initial: int, enabled: bool, desc: str):
        self.bar, self.enabled, self.total = None, enabled, total
        if not enabled:
            return
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        except ImportError:
            pass

    def update(self, n: int):
        if self.bar is not None:
            self.bar.update(n)

    def note(self, step: int, text: str):
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        elif self.enabled:
            print(f"step {step}/{self.total} {text}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _check_resumable(saved: dict, model_cfg: LMConfig, cfg: TrainConfig, path: Path):
    # Block checkpointing changes memory, not the function: a run may resume with it on or off.
    def function(d: dict) -> dict:
        return {k: v for k, v in {**LMConfig().to_dict(), **d}.items() if k != "checkpoint_blocks"}
    if function(saved.get("model") or {}) != function(model_cfg.to_dict()):
        raise CheckpointError(f"cannot resume from {str(path)!r}: its model config differs from "
                              "this run's")
    old = saved.get("train", {})
    diff = [k for k, v in cfg.to_dict().items() if k not in RESUME_FREE and old.get(k) != v]
    if diff:
        raise CheckpointError(
            f"cannot resume from {str(path)!r}: train config differs in "
            + ", ".join(f"{k} (checkpoint {old.get(k)!r}, now {getattr(cfg, k)!r})" for k in diff))


def train(model_cfg: LMConfig, cfg: TrainConfig, dataset, resume: bool = False,
          peak_tflops: Optional[float] = None, label: str = "train",
          callback: Optional[Callable[[int], None]] = None,
          on_ready: Optional[Callable[[], None]] = None) -> dict:
    """Train `TransformerLM(model_cfg)` on `dataset` (a `sqt.data.TextDataset`). With `resume`,
    continue from the checkpoint in `cfg.out_dir` and end exactly where an uninterrupted run would
    (on CPU; GPU kernels are not bitwise deterministic). `callback(step)` runs after every step.
    `on_ready()` runs once, when the step is compiled (and captured) and steady-state training
    begins; a sweep uses it to queue for the device while other runs train.
    Returns losses, accuracy, curves, speed (ms/step, tokens/s, MFU vs `peak_tflops`) and the
    model (under "model", not JSON)."""
    if model_cfg.vocab_size != dataset.tokenizer.vocab_size:
        raise ValueError(f"vocab_size={model_cfg.vocab_size} but the dataset's tokenizer has "
                         f"{dataset.tokenizer.vocab_size} symbols; set vocab_size to match")
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len="
                         f"{model_cfg.max_seq_len}")
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = DTYPES[cfg.dtype] or (torch.bfloat16 if cuda else torch.float32)
    use_compile = cuda if cfg.compile is None else cfg.compile
    use_graph = cuda if cfg.cuda_graph is None else cfg.cuda_graph
    if use_graph and not cuda:
        raise ValueError(f"cuda_graph=True on device {str(device)!r}: CUDA graphs need a CUDA "
                         "device")
    out = Path(cfg.out_dir) if cfg.out_dir else None
    if resume and out is None:
        raise ValueError("resume=True needs out_dir: the directory holding the checkpoint")

    torch.manual_seed(cfg.seed)
    model = TransformerLM(model_cfg).to(device)
    opt = make_optimizer(model, cfg, device, graphed=use_graph)
    train_ids = torch.from_numpy(dataset.train.astype(np.int64))
    val_ids = torch.from_numpy(dataset.val.astype(np.int64))
    sampler = Sampler(train_ids.to(device), cfg.batch_size, cfg.seq_len, cfg.seed)
    val_x, val_y = fixed_batches(val_ids, cfg.eval_batches, cfg.batch_size, cfg.seq_len, device)
    step, curves, best = 0, [], (math.inf, None)
    loss_sum = torch.zeros((), device=device)
    loss_n = 0
    if resume and not (out / "train_state.pt").is_file():
        print(f"note: no checkpoint in {str(out)!r} yet; starting from step 0", file=sys.stderr)
    elif resume:
        _check_resumable(read_config(out), model.config, cfg, out)
        st = load_train_state(out)
        model.load_state_dict(load_model(out)[0].state_dict())
        opt.load_state_dict(st["optimizer"])
        step, curves, best = st["step"], st["curves"], tuple(st["best"])
        loss_sum.fill_(st["loss_sum"])
        loss_n = st["loss_n"]
        torch.set_rng_state(st["rng_cpu"])
        if cuda and st.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(st["rng_cuda"], device)

    def autocast():
        # No autocast weight cache: a captured graph must not depend on a cache filled outside it.
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32,
                              cache_enabled=False)

    def loss_fn(x, y):
        with autocast():
            logits = model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    # The compiled function takes the loss in with the model, so inductor fuses the last matmul's
    # epilogue and the cross-entropy. Evaluation stays eager: compiling it would cost a second
    # graph's compile time for a few dozen batches.
    step_loss = torch.compile(loss_fn, mode=cfg.compile_mode) if use_compile else loss_fn

    def save(final: bool):
        state = {"optimizer": opt.state_dict(), "step": step, "curves": curves, "best": list(best),
                 "loss_sum": loss_sum.item(), "loss_n": loss_n,
                 "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state(device) if cuda else None}
        save_model(out, model, meta={"tokenizer": dataset.tokenizer.to_dict(),
                                     "train": cfg.to_dict(), "dataset": dataset.describe(),
                                     "step": step, "final": final}, train_state=state)
        lines = "".join(json.dumps(c) + "\n" for c in curves)
        atomic_write_bytes(out / "curves.jsonl", lines.encode())

    progress = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    bar = _Progress(cfg.steps, step, progress, label)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    # Steady-state timing starts after a few steps (compilation, allocator warm-up) and excludes
    # evaluation; the clock is read only where the loop synchronises anyway.
    warm_until = step + min(10, max(1, (cfg.steps - step) // 10))
    timed_s, timed_steps, t_mark = 0.0, 0, None
    params = [p for p in model.parameters() if p.requires_grad]
    step_t = torch.tensor(step, device=device)     # the step counter the sampler reads

    def one_step():
        """A whole optimizer step with no host synchronisation, so it can be captured."""
        x, y = sampler.batch(step_t)
        opt.zero_grad(set_to_none=not use_graph)   # a graph needs its gradients to stay put
        loss = step_loss(x, y)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=cuda)
        opt.step()
        loss_sum.add_(loss.detach())
        step_t.add_(1)

    # With CUDA graphs, the first steps run normally on a side stream (compilation, lazy optimizer
    # state) and are real training steps; then one step is captured and replayed from there on, so
    # a step costs one launch instead of hundreds.
    graph, graph_from = None, step + 3
    side = torch.cuda.Stream(device) if use_graph else None
    t_start = time.perf_counter()
    model.train()
    while step < cfg.steps:
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr
        sampler.prepare(step)
        if graph is not None:
            graph.replay()
        elif use_graph and step >= graph_from:
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                one_step()
            graph.replay()
        elif use_graph:
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                one_step()
            torch.cuda.current_stream(device).wait_stream(side)
        else:
            one_step()
        loss_n += 1
        step += 1
        bar.update(1)
        if on_ready is not None and (graph is not None or not use_graph):
            # Compiled and captured: from here on the run needs the device, not the CPU.
            on_ready()
            on_ready = None
            if t_mark is None:
                warm_until = max(warm_until, step + 1)
        if step == warm_until:
            if cuda:
                torch.cuda.synchronize(device)
            t_mark, mark_step = time.perf_counter(), step
        if step % cfg.eval_every == 0 or step == cfg.steps:
            train_loss = loss_sum.item() / loss_n   # the one host sync between evaluations
            if t_mark is not None:
                timed_s += time.perf_counter() - t_mark
                timed_steps += step - mark_step
            val_loss, val_acc = evaluate(model, val_x, val_y, autocast)
            curves.append({"step": step, "train_loss": train_loss, "val_loss": val_loss,
                           "val_acc": val_acc, "lr": lr})
            if val_loss < best[0]:
                best = (val_loss, step)
            loss_sum.zero_()
            loss_n = 0
            bar.note(step, f"train {train_loss:.3f} val {val_loss:.3f}")
            if t_mark is not None:
                if cuda:
                    torch.cuda.synchronize(device)
                t_mark, mark_step = time.perf_counter(), step
        if out is not None and (step == cfg.steps or (
                cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            save(final=step == cfg.steps)
        if callback is not None:
            callback(step)
    bar.close()
    wall = time.perf_counter() - t_start

    ms_per_step = 1e3 * timed_s / timed_steps if timed_steps else None
    flops = train_step_flops(model.config, cfg.batch_size, cfg.seq_len)
    achieved = flops / (ms_per_step * 1e-3) / 1e12 if ms_per_step else None
    last = curves[-1] if curves else {}
    return {
        "label": label,
        "model_config": model.config.to_dict(),
        "train_config": cfg.to_dict(),
        "dataset": dataset.describe(),
        "params": model.num_params(),
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "compiled": use_compile,
        "cuda_graph": use_graph,
        "compile_mode": cfg.compile_mode,
        "best_val_loss": best[0], "best_step": best[1],
        "final_val_loss": last.get("val_loss"), "final_train_loss": last.get("train_loss"),
        "final_val_acc": last.get("val_acc"),
        "best_val_acc": next((c["val_acc"] for c in curves if c["step"] == best[1]), None),
        "curves": curves,
        "wall_s": wall, "ms_per_step": ms_per_step,
        "tokens_per_s": tokens_per_step / (ms_per_step * 1e-3) if ms_per_step else None,
        "train_flops_per_step": flops, "achieved_tflops": achieved,
        "peak_tflops": peak_tflops,
        "mfu": achieved / peak_tflops if achieved and peak_tflops else None,
        "run_record": run_record(device),
        "model": model,
    }


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="sqt train", description="Train a character-level LM.")
    p.add_argument("--size", default="small", choices=[k for k in PRESETS if k != "sqa-dense"],
                   help="model size preset")
    p.add_argument("--layers", nargs="+", default=["mha"],
                   help="one variant for all layers, or one per layer (e.g. sqt mha mha mha)")
    p.add_argument("--data", default="tinyshakespeare",
                   help="'tinyshakespeare' (bundled) or a path to a UTF-8 text file")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--checkpoint-blocks", action="store_true",
                   help="recompute each block in the backward pass: less memory, ~1 more forward")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("compile", "cuda_graph", "progress"):
            continue
        default = getattr(d, f.name)
        kind = type(default) if default is not None else (float if f.name == "min_lr" else str)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default)
    p.add_argument("--compile", dest="compile", action="store_true", default=None)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", default=None,
                   help="run the step eagerly instead of replaying one captured CUDA graph")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is in --out-dir")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .data import load_dataset
    try:
        data = load_dataset(args.data)
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
        layers = args.layers[0] if len(args.layers) == 1 else tuple(args.layers)
        model_cfg = preset(args.size, vocab_size=data.tokenizer.vocab_size, dropout=args.dropout,
                           checkpoint_blocks=args.checkpoint_blocks, layers=layers,
                           max_seq_len=max(cfg.seq_len, PRESETS[args.size]["max_seq_len"]))
        result = train(model_cfg, cfg, data, resume=args.resume, label=args.size)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.pop("model")
    keys = ("params", "best_val_loss", "best_step", "final_val_loss", "final_val_acc",
            "ms_per_step", "tokens_per_s", "wall_s")
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    if cfg.out_dir:
        from .utils import atomic_write_json
        atomic_write_json(Path(cfg.out_dir) / "result.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
