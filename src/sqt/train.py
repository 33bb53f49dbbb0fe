"""The training loop: AdamW with warmup + cosine, gradient clipping and accumulation, bf16
autocast on CUDA, optional torch.compile and a captured CUDA graph per step, evaluation on fixed
validation windows, learning curves, atomic checkpoints and an exact resume. Its settings are
sqt.runconfig's TrainConfig; its command line is `sqt train` (sqt.cli)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, load_model, load_train_state, read_config, save_model
from .accounting import train_step_flops
from .config import LMConfig
from .model import TransformerLM
from .moe import cuda_graph_blocker
from .runconfig import RESUME_FREE, TrainConfig
from .utils import atomic_write_bytes, peak_for, resolve_device, run_record
from .windows import fixed_windows, make_feed

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine to `min_lr` at the last step (of a resolved config).
    `step` counts from 0."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    lo = cfg.final_min_lr
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, *,
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


@torch.inference_mode()
def evaluate(model, xs, ys, autocast, *, micro_batch: int) -> tuple[float, float, Optional[list]]:
    """Mean loss (nats/token), next-token accuracy and, for a mixture of experts, each layer's
    fraction of token-slots per expert, over the windows, in eval mode, a micro-batch at a time."""
    was = model.training
    model.eval()
    loss = torch.zeros((), device=xs.device, dtype=torch.float64)
    correct = torch.zeros((), device=xs.device, dtype=torch.long)
    slots = 0
    for x, y in zip(xs.split(micro_batch), ys.split(micro_batch)):
        with autocast():
            logits = model(x)
        loss += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        correct += (logits.argmax(-1) == y).sum()
        if model.moe_layers():
            slots = slots + torch.stack(model.expert_load())
    model.train(was)
    n = ys.numel()
    load = (slots / slots.sum(-1, keepdim=True)).tolist() if model.moe_layers() else None
    return loss.item() / n, correct.item() / n, load


class _Reporter:
    """What a run says while it trains: a progress bar on stderr and/or one JSON line per
    evaluation on stdout (what a pipe or a log file gets)."""

    def __init__(self, total: int, initial: int, *, bar: bool, log: bool, label: str):
        self.bar, self.plain, self.log, self.total, self.label = None, bar, log, total, label
        if bar:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, desc=label, dynamic_ncols=True)
                self.plain = False
            except ImportError:
                pass

    def update(self, n: int):
        if self.bar is not None:
            self.bar.update(n)

    def evaluation(self, point: dict):
        text = f"train {point['train_loss']:.3f} val {point['val_loss']:.3f}"
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        elif self.plain:
            print(f"step {point['step']}/{self.total} {text}", file=sys.stderr, flush=True)
        if self.log:
            print(json.dumps({"event": "eval", "label": self.label, **point}), flush=True)

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
    old = {**TrainConfig().to_dict(), **saved.get("train", {})}   # fields added since: defaults
    diff = [k for k, v in cfg.to_dict().items() if k not in RESUME_FREE and old.get(k) != v]
    if diff:
        raise CheckpointError(
            f"cannot resume from {str(path)!r}: train config differs in "
            + ", ".join(f"{k} (checkpoint {old.get(k)!r}, now {getattr(cfg, k)!r})" for k in diff))


# LMConfig fields that change how a model trains or runs, not the function its weights compute.
NOT_FUNCTION = ("dropout", "checkpoint_blocks", "backend", "moe_impl")


def _initial_weights(init_from, model_cfg: LMConfig) -> dict:
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


def train(model_cfg: LMConfig, cfg: TrainConfig, dataset, *, resume: bool = False,
          init_from=None, peak_tflops: Optional[float] = None, label: str = "train",
          callback: Optional[Callable[[int], None]] = None,
          on_ready: Optional[Callable[[], None]] = None) -> dict:
    """Train `TransformerLM(model_cfg)` on `dataset` (a `sqt.data.TextDataset` or
    `PreparedDataset`: `tokenizer`, `train` and `val` token splits, `describe()`; the checkpoint
    stores its tokenizer as tokenizer.json). With `resume`, continue from the checkpoint in
    `cfg.out_dir` and end exactly where an uninterrupted run would (on CPU; GPU kernels are not
    bitwise deterministic). `init_from` (a state dict, or a checkpoint directory of the same
    model) replaces the seeded initial weights: a fresh run that starts from a converted or
    pretrained model; a resumed run ignores it, its checkpoint being newer. `callback(step)` runs
    after every step. `on_ready()` runs once, when the step is compiled (and captured) and
    steady-state training begins; a sweep uses it to queue for the device while other runs train. `peak_tflops`: a measured peak for MFU (see peak_for).
    Returns losses, accuracy, curves, the budget, speed (ms/step, tokens/s, MFU) and the model
    (under "model", not JSON)."""
    if model_cfg.vocab_size != dataset.tokenizer.vocab_size:
        raise ValueError(f"vocab_size={model_cfg.vocab_size} but the dataset's tokenizer has "
                         f"{dataset.tokenizer.vocab_size} symbols; set vocab_size to match")
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len="
                         f"{model_cfg.max_seq_len}")
    n_train = len(dataset.train)
    budget = cfg.budget(n_train)
    cfg = cfg.resolve(n_train)
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = DTYPES[cfg.dtype] or (torch.bfloat16 if cuda else torch.float32)
    use_compile = cuda if cfg.compile is None else cfg.compile
    use_graph = cuda if cfg.cuda_graph is None else cfg.cuda_graph
    blocker = cuda_graph_blocker(model_cfg, device) if use_graph else None
    if blocker:
        print(f"note: no CUDA graph for this run ({blocker}); each step runs uncaptured",
              file=sys.stderr)
        use_graph = False
    if use_graph and not cuda:
        raise ValueError(f"cuda_graph=True on device {str(device)!r}: CUDA graphs need a CUDA "
                         "device")
    out = Path(cfg.out_dir) if cfg.out_dir else None
    if resume and out is None:
        raise ValueError("resume=True needs out_dir: the directory holding the checkpoint")

    torch.manual_seed(cfg.seed)
    model = TransformerLM(model_cfg).to(device)
    if init_from is not None and not (resume and (out / "train_state.pt").is_file()):
        model.load_state_dict(_initial_weights(init_from, model_cfg))
    opt = make_optimizer(model, cfg, device, graphed=use_graph)
    sampler = make_feed(dataset.train, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                        seed=cfg.seed, device=device, on_device=cfg.data_on_device)
    val_x, val_y = fixed_windows(dataset.val, cfg.eval_batches * cfg.batch_size, cfg.seq_len,
                                 device)
    step, curves, best = 0, [], (math.inf, None)
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)        # MoE auxiliary loss since the last evaluation
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
        aux_sum.fill_(st.get("aux_sum", 0.0))
        loss_n = st["loss_n"]
        torch.set_rng_state(st["rng_cpu"])
        if cuda and st.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(st["rng_cuda"], device)

    def autocast():
        # No autocast weight cache: a captured graph must not depend on a cache filled outside it.
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32,
                              cache_enabled=False)

    def loss_fn(x, y):
        """(cross-entropy, MoE auxiliary loss); the aux is an exact 0 for a dense model."""
        with autocast():
            logits, aux = model(x, return_aux=True)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), aux

    # The compiled function takes the loss in with the model, so inductor fuses the last matmul's
    # epilogue and the cross-entropy. Evaluation stays eager: compiling it would cost a second
    # graph's compile time for a few dozen batches.
    step_loss = torch.compile(loss_fn, mode=cfg.compile_mode) if use_compile else loss_fn

    def save(final: bool):
        state = {"optimizer": opt.state_dict(), "step": step, "curves": curves, "best": list(best),
                 "loss_sum": loss_sum.item(), "loss_n": loss_n, "aux_sum": aux_sum.item(),
                 "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state(device) if cuda else None}
        save_model(out, model, tokenizer=dataset.tokenizer,
                   meta={"train": cfg.to_dict(), "budget": budget, "dataset": dataset.describe(),
                         "step": step, "final": final}, train_state=state)
        lines = "".join(json.dumps(c) + "\n" for c in curves)
        atomic_write_bytes(out / "curves.jsonl", lines.encode())

    reporter = _Reporter(cfg.steps, step, label=label,
                         bar=cfg.progress if cfg.progress is not None else sys.stderr.isatty(),
                         log=cfg.log if cfg.log is not None else not sys.stderr.isatty())
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
        for xm, ym in zip(x.chunk(cfg.grad_accum), y.chunk(cfg.grad_accum)):
            # Equal micro-batches, each mean loss over grad_accum: the gradients add up to those
            # of the whole batch's mean loss.
            loss, aux = step_loss(xm, ym)
            ((loss + aux) / cfg.grad_accum).backward()
            loss_sum.add_(loss.detach() / cfg.grad_accum)
            aux_sum.add_(aux.detach() / cfg.grad_accum)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=cuda)
        opt.step()
        step_t.add_(1)

    # With CUDA graphs, the first steps run normally on a side stream (compilation, lazy optimizer
    # state) and are real training steps; then one step is captured and replayed from there on, so
    # a step costs one launch instead of hundreds.
    graph, graph_from = None, step + 3
    side = torch.cuda.Stream(device) if use_graph else None
    t_start = time.perf_counter()
    t_interval, interval_from = t_start, step      # the log line's ms/step: since the last one
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
        reporter.update(1)
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
        evaluated = step % cfg.eval_every == 0 or step == cfg.steps
        if evaluated:
            train_loss = loss_sum.item() / loss_n   # the one host sync between evaluations
            now = time.perf_counter()
            if t_mark is not None:
                timed_s += now - t_mark
                timed_steps += step - mark_step
            val_loss, val_acc, expert_load = evaluate(model, val_x, val_y, autocast,
                                                      micro_batch=cfg.micro_batch)
            point = {"step": step, "train_loss": train_loss, "val_loss": val_loss,
                     "val_acc": val_acc, "lr": lr}
            if expert_load is not None:
                point.update(aux_loss=aux_sum.item() / loss_n, expert_load=expert_load)
            curves.append(point)
            if val_loss < best[0]:
                best = (val_loss, step)
            loss_sum.zero_()
            aux_sum.zero_()
            loss_n = 0
            interval_ms = 1e3 * (now - t_interval) / (step - interval_from)
            reporter.evaluation({"step": step, "tokens": step * tokens_per_step, **point,
                                 "ms_per_step": round(interval_ms, 3),
                                 "tokens_per_s": round(tokens_per_step / interval_ms * 1e3),
                                 "elapsed_s": round(now - t_start, 3)})
        if out is not None and (step == cfg.steps or (
                cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            save(final=step == cfg.steps)
        if evaluated:
            # Evaluation and checkpoints are not training time: both clocks restart after them.
            if cuda:
                torch.cuda.synchronize(device)
            t_interval, interval_from = time.perf_counter(), step
            if t_mark is not None:
                t_mark, mark_step = t_interval, step
        if callback is not None:
            callback(step)
    reporter.close()
    wall = time.perf_counter() - t_start

    ms_per_step = 1e3 * timed_s / timed_steps if timed_steps else None
    flops = train_step_flops(model.config, cfg.batch_size, cfg.seq_len)
    achieved = flops / (ms_per_step * 1e-3) / 1e12 if ms_per_step else None
    peak, peak_source = peak_for(device, dtype, measured=peak_tflops)
    last = curves[-1] if curves else {}
    return {
        "label": label,
        "model_config": model.config.to_dict(),
        "train_config": cfg.to_dict(),
        "budget": budget,
        "dataset": dataset.describe(),
        "params": model.num_params(),
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "compiled": use_compile,
        "cuda_graph": use_graph, "data_feed": sampler.kind,
        "compile_mode": cfg.compile_mode,
        "best_val_loss": best[0], "best_step": best[1],
        "final_val_loss": last.get("val_loss"), "final_train_loss": last.get("train_loss"),
        "final_val_acc": last.get("val_acc"),
        "best_val_acc": next((c["val_acc"] for c in curves if c["step"] == best[1]), None),
        "curves": curves,
        "wall_s": wall, "ms_per_step": ms_per_step,
        "tokens_per_s": tokens_per_step / (ms_per_step * 1e-3) if ms_per_step else None,
        "train_flops_per_step": flops, "achieved_tflops": achieved,
        "peak_tflops": peak, "peak_source": peak_source,
        "mfu": achieved / peak if achieved and peak else None,
        "run_record": run_record(device),
        "model": model,
    }
