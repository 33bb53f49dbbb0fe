"""The training loop: AdamW with warmup + cosine, gradient clipping and accumulation, bf16
autocast on CUDA, optional torch.compile and a captured CUDA graph per step, evaluation on fixed
validation windows, learning curves, checkpoints swapped in whole, an exact resume, and a stop
with a clear error when the loss stops being finite. Its settings are sqt.runconfig's TrainConfig;
its command line is `sqt train` (sqt.cli)."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .accounting import train_step_flops
from .checkpoint import RunDirectory, read_config
from .config import LMConfig
from .divergence import FiniteWatch, NonFiniteLoss
from .model import TransformerLM
from .moe import cuda_graph_blocker
from .progress import Reporter
from .resume import check_resumable, curves_bytes, finished, initial_weights, restore
from .runconfig import TrainConfig
from .utils import check_split_ids, peak_for, resolve_device, run_record
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


def train(model_cfg: LMConfig, cfg: TrainConfig, dataset, *, resume: bool = False,
          init_from=None, run_file: Optional[str] = None, peak_tflops: Optional[float] = None,
          label: str = "train", callback: Optional[Callable[[int], None]] = None,
          on_ready: Optional[Callable[[], None]] = None) -> dict:
    """Train `TransformerLM(model_cfg)` on `dataset` (`tokenizer`, `train` and `val` token
    splits, `describe()`: a `sqt.data.TextDataset` or `PreparedDataset`).

    With `cfg.out_dir`, the run directory is held for this process alone (sqt.checkpoint's
    RunDirectory): a run already there is refused unless `resume` (continue it from its
    checkpoint and end exactly where an uninterrupted run would, on CPU; GPU kernels are not
    bitwise deterministic) or `cfg.overwrite` (delete it and start again). `run_file` is saved as
    its config.toml. Resuming a finished run trains and rewrites nothing and returns its record.
    `init_from` (a state dict, or a checkpoint directory of the same model) replaces the seeded
    initial weights: a fresh run that starts from a converted or pretrained model; a resumed run
    with a checkpoint ignores it, its checkpoint being newer.

    A loss (or gradient norm) that becomes NaN or infinite is recorded on the device inside the
    step and read where the loop synchronises anyway (evaluations and checkpoints): the run
    raises NonFiniteLoss there, and no checkpoint is written after that step.

    `callback(step)` runs after every step. `on_ready()` runs once, when the step is compiled (and
    captured) and steady-state training begins; a sweep uses it to queue for the device while
    other runs train. `peak_tflops`: a measured peak for MFU (see peak_for). Returns losses,
    accuracy, curves, the budget, speed (ms/step, tokens/s, MFU) and the model (under "model",
    not JSON)."""
    check_run(model_cfg, cfg, dataset, resume=resume)
    claim = (RunDirectory(cfg.out_dir).claim(resume=resume, overwrite=cfg.overwrite)
             if cfg.out_dir else contextlib.nullcontext())
    with claim as run:
        return _train(model_cfg, cfg, dataset, run=run, resume=resume, init_from=init_from,
                      run_file=run_file, peak_tflops=peak_tflops, label=label,
                      callback=callback, on_ready=on_ready)


def check_run(model_cfg: LMConfig, cfg: TrainConfig, dataset, *, resume: bool = False) -> None:
    """What `train` refuses before it starts, checked without reading the data or writing
    anything (a run directory's checkpoint config is read), so that a command line can refuse
    before it prints anything: settings that do not fit the data or the device, a run directory
    that is not to be replaced, a checkpoint of another run to resume."""
    if model_cfg.vocab_size != dataset.tokenizer.vocab_size:
        raise ValueError(f"vocab_size={model_cfg.vocab_size} but the dataset's tokenizer has "
                         f"{dataset.tokenizer.vocab_size} symbols; set vocab_size to match")
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len="
                         f"{model_cfg.max_seq_len}")
    if resume and not cfg.out_dir:
        raise ValueError("resume=True needs out_dir: the directory holding the checkpoint")
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
    if cfg.out_dir:
        run = RunDirectory(cfg.out_dir)
        run.check(resume=resume, overwrite=cfg.overwrite)
        if resume and run.checkpoint() is not None:
            check_resumable(read_config(run.checkpoint()), model_cfg,
                            cfg.resolve(len(dataset.train)), run.checkpoint(), dataset.describe())


def _train(model_cfg, cfg, dataset, *, run: Optional[RunDirectory], resume, init_from,
           run_file, peak_tflops, label, callback, on_ready) -> dict:
    name = dataset.describe().get("name")
    # Token ids enter here, once: the step itself never checks them (it must not synchronise).
    # The splits stay where they are (a memmap is read in chunks, never held whole).
    for split in ("train", "val"):
        check_split_ids(getattr(dataset, split), model_cfg.vocab_size,
                        name=f"dataset {name!r} {split} split")
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

    info = dict(zip(("peak_tflops", "peak_source"), peak_for(device, dtype, measured=peak_tflops)),
                device=str(device), dtype=str(dtype).replace("torch.", ""),
                compiled=use_compile, cuda_graph=use_graph)
    torch.manual_seed(cfg.seed)
    model = TransformerLM(model_cfg).to(device)
    model.check_ids = False     # its ids were checked above
    if init_from is not None and not (resume and run.checkpoint() is not None):
        model.load_state_dict(initial_weights(init_from, model_cfg))
    opt = make_optimizer(model, cfg, device, graphed=use_graph)
    sampler = make_feed(dataset.train, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                        seed=cfg.seed, device=device, on_device=cfg.data_on_device)
    info["data_feed"] = sampler.kind
    val_x, val_y = fixed_windows(dataset.val, cfg.eval_batches * cfg.batch_size, cfg.seq_len,
                                 device)
    step, curves, best = 0, [], (math.inf, None)
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)        # MoE auxiliary loss since the last evaluation
    loss_n = 0
    state = restore(run, model, opt, cfg, device, dataset.describe()) if resume else None
    if state is not None:
        step, curves, best = state["step"], state["curves"], tuple(state["best"])
        loss_sum.fill_(state["loss_sum"])
        aux_sum.fill_(state.get("aux_sum", 0.0))
        loss_n = state["loss_n"]
        if step >= cfg.steps:
            record = finished(run, state, _result(model, cfg, budget, dataset, info, curves,
                                                  best, label, timing=None))
            model.check_ids = True
            return {**record, "model": model}
        # Run-level files follow the checkpoint: a kill after it may have left them behind.
        run.write("curves.jsonl", curves_bytes(curves))
    if run is not None and run_file is not None:
        run.write("config.toml", run_file.encode())
    kept_step = step if state is not None else None

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

    reporter = Reporter(cfg.steps, step, label=label,
                        bar=cfg.progress if cfg.progress is not None else sys.stderr.isatty(),
                        log=cfg.log if cfg.log is not None else not sys.stderr.isatty())
    tokens_per_step = cfg.batch_size * cfg.seq_len
    # Steady-state timing starts after a few steps (compilation, allocator warm-up) and excludes
    # evaluation; the clock is read only where the loop synchronises anyway.
    warm_until = step + min(10, max(1, (cfg.steps - step) // 10))
    timed_s, timed_steps, t_mark = 0.0, 0, None
    params = [p for p in model.parameters() if p.requires_grad]
    step_t = torch.tensor(step, device=device)     # the step counter the sampler reads
    watch = FiniteWatch(device)
    where = run.checkpoint_path if run is not None else None

    def one_step():
        """A whole optimizer step with no host synchronisation, so it can be captured."""
        x, y = sampler.batch(step_t)
        opt.zero_grad(set_to_none=not use_graph)   # a graph needs its gradients to stay put
        for xm, ym in zip(x.chunk(cfg.grad_accum), y.chunk(cfg.grad_accum)):
            # Equal micro-batches, each mean loss over grad_accum: the gradients add up to those
            # of the whole batch's mean loss.
            loss, aux = step_loss(xm, ym)
            ((loss + aux) / cfg.grad_accum).backward()
            watch.note(loss, 0, step_t)
            loss_sum.add_(loss.detach() / cfg.grad_accum)
            aux_sum.add_(aux.detach() / cfg.grad_accum)
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=cuda)
            watch.note(norm, 1, step_t)
        opt.step()
        step_t.add_(1)

    def save(result: Optional[dict] = None):
        nonlocal kept_step
        # Never a checkpoint of weights trained on a non-finite loss.
        watch.check(kept_step=kept_step, where=where)
        state = {"optimizer": opt.state_dict(), "step": step, "curves": curves, "best": list(best),
                 "loss_sum": loss_sum.item(), "loss_n": loss_n, "aux_sum": aux_sum.item(),
                 "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state(device) if cuda else None}
        if result is not None:
            state["result"] = result
        run.save(model, tokenizer=dataset.tokenizer, train_state=state, meta={
            "train": cfg.to_dict(), "budget": budget, "dataset": dataset.describe(),
            "step": step, "final": result is not None})
        run.write("curves.jsonl", curves_bytes(curves))
        kept_step = step

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
            watch.check(kept_step=kept_step, where=where)
            now = time.perf_counter()
            if t_mark is not None:
                timed_s += now - t_mark
                timed_steps += step - mark_step
            val_loss, val_acc, expert_load = evaluate(model, val_x, val_y, autocast,
                                                      micro_batch=cfg.micro_batch)
            if not math.isfinite(val_loss):
                raise NonFiniteLoss(what="validation loss", value=val_loss, step=step,
                                    kept_step=kept_step, where=where)
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
        if run is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 \
                and step < cfg.steps:
            save()
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
    watch.check(kept_step=kept_step, where=where)
    timing = {"wall_s": time.perf_counter() - t_start, "timed_s": timed_s,
              "timed_steps": timed_steps}
    result = _result(model, cfg, budget, dataset, info, curves, best, label, timing=timing)
    if run is not None:
        save(result)
        run.write("result.json", (json.dumps(result, indent=2) + "\n").encode())
    model.check_ids = True
    return {**result, "model": model}


def _result(model, cfg, budget, dataset, info: dict, curves, best, label, *,
            timing: Optional[dict]) -> dict:
    """A run's record (JSON): losses, accuracy, curves, budget, speed. `info`: device, dtype,
    compiled, cuda_graph, the peak MFU is taken against; `timing` None: the run was not timed
    (an older finished run resumed)."""
    timed_s, timed_steps = (timing["timed_s"], timing["timed_steps"]) if timing else (0.0, 0)
    ms_per_step = 1e3 * timed_s / timed_steps if timed_steps else None
    tokens_per_step = cfg.batch_size * cfg.seq_len
    flops = train_step_flops(model.config, cfg.batch_size, cfg.seq_len)
    achieved = flops / (ms_per_step * 1e-3) / 1e12 if ms_per_step else None
    peak = info["peak_tflops"]
    last = curves[-1] if curves else {}
    return {
        "label": label,
        "model_config": model.config.to_dict(),
        "train_config": cfg.to_dict(),
        "budget": budget,
        "dataset": dataset.describe(),
        "params": model.num_params(),
        "device": info["device"], "dtype": info["dtype"], "compiled": info["compiled"],
        "cuda_graph": info["cuda_graph"], "data_feed": info["data_feed"],
        "compile_mode": cfg.compile_mode,
        "best_val_loss": best[0], "best_step": best[1],
        "final_val_loss": last.get("val_loss"), "final_train_loss": last.get("train_loss"),
        "final_val_acc": last.get("val_acc"),
        "best_val_acc": next((c["val_acc"] for c in curves if c["step"] == best[1]), None),
        "curves": curves,
        "wall_s": timing["wall_s"] if timing else None, "ms_per_step": ms_per_step,
        "tokens_per_s": tokens_per_step / (ms_per_step * 1e-3) if ms_per_step else None,
        "train_flops_per_step": flops, "achieved_tflops": achieved,
        "peak_tflops": peak, "peak_source": info["peak_source"],
        "mfu": achieved / peak if achieved and peak else None,
        "run_record": run_record(info["device"]),
    }
