"""The training loop: AdamW with warmup + cosine, gradient clipping and accumulation, bf16
autocast on CUDA, optional torch.compile and a captured CUDA graph per step, evaluation on fixed
validation windows, learning curves, checkpoints swapped in whole, an exact resume, and a stop
with a clear error when the loss stops being finite; alone or as one of several processes under
torchrun (DDP or FSDP2, sqt.distributed). Its settings are sqt.runconfig's TrainConfig; its
command line is `sqt train` (sqt.cli_train)."""

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
from .checkpoint import RunDirectory
from .config import LMConfig
from .distributed import Parallel, join_processes
from .divergence import FiniteWatch, NonFiniteLoss
from .evaluation import evaluate
from .model import TransformerLM
from .moe import cuda_graph_blocker
from .optim import lr_at, make_optimizer, set_lr
from .progress import Reporter
from .resume import (check_arguments, check_directory, check_run, curves_bytes, finished,
                     initial_weights, restore)
from .runconfig import TrainConfig
from .utils import check_split_ids, peak_for, run_record
from .windows import fixed_windows, make_feed

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


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
    not JSON).

    Under torchrun every process calls this (sqt.distributed: DDP, or FSDP2 with `cfg.fsdp`):
    each trains on its share of every batch, rank 0 alone writes the run directory, and every
    rank returns the same record."""
    check_arguments(model_cfg, cfg, dataset)
    with join_processes(cfg.device, fsdp=cfg.fsdp) as parallel:
        check_run(model_cfg, cfg, dataset, resume=resume, world_size=parallel.world_size,
                  directory=False)

        def claim():
            if not cfg.out_dir:
                return contextlib.nullcontext()
            check_directory(model_cfg, cfg, dataset, resume=resume)
            return RunDirectory(cfg.out_dir).claim(resume=resume, overwrite=cfg.overwrite)
        # Only rank 0 checks, holds and writes the run directory; the others wait for its claim
        # and stop with its error.
        with parallel.main_first(claim) as run:
            result = _train(model_cfg, cfg, dataset, run=run, parallel=parallel, resume=resume,
                            init_from=init_from, run_file=run_file, peak_tflops=peak_tflops,
                            label=label, callback=callback, on_ready=on_ready)
        parallel.barrier()    # no rank returns before the run directory is written and free
        return result


def _train(model_cfg, cfg, dataset, *, run: Optional[RunDirectory], parallel: Parallel, resume,
           init_from, run_file, peak_tflops, label, callback, on_ready) -> dict:
    name = dataset.describe().get("name")
    # Token ids enter here, once: the step itself never checks them (it must not synchronise).
    # The splits stay where they are (a memmap is read in chunks, never held whole).
    for split in ("train", "val"):
        check_split_ids(getattr(dataset, split), model_cfg.vocab_size,
                        name=f"dataset {name!r} {split} split")
    n_train = len(dataset.train)
    budget = cfg.budget(n_train)
    cfg = cfg.resolve(n_train)
    device, main = parallel.device, parallel.is_main
    cuda = device.type == "cuda"
    if cuda:   # the run's own peak, not that of what this process ran before (a grid's worker)
        torch.cuda.reset_peak_memory_stats(device)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = DTYPES[cfg.dtype] or (torch.bfloat16 if cuda else torch.float32)
    use_compile = cuda if cfg.compile is None else cfg.compile
    use_graph = cuda if cfg.cuda_graph is None else cfg.cuda_graph
    blocker = (cuda_graph_blocker(model_cfg, device) or parallel.graph_blocker()) if use_graph \
        else None
    if blocker and main:
        print(f"note: no CUDA graph for this run ({blocker}); each step runs uncaptured",
              file=sys.stderr)
    if main and cfg.warmup >= cfg.steps > 1:
        print(f"note: warmup={cfg.warmup} >= steps={cfg.steps}: the learning rate rises for the "
              f"whole run and never reaches its peak lr={cfg.lr:g}", file=sys.stderr)
    use_graph = use_graph and not blocker
    if parallel.backend is not None and main:
        print(f"sqt: {parallel.world_size} processes, {parallel.mode.upper()} over "
              f"{parallel.backend}, each on its {device.type}", file=sys.stderr)

    info = dict(zip(("peak_tflops", "peak_source"), peak_for(device, dtype, measured=peak_tflops)),
                device=str(device), dtype=str(dtype).replace("torch.", ""),
                compiled=use_compile, cuda_graph=use_graph, **parallel.describe())
    torch.manual_seed(cfg.seed)            # the same initial weights in every process
    model = TransformerLM(model_cfg).to(device)
    model.check_ids = False     # its ids were checked above
    source = RunDirectory(cfg.out_dir) if cfg.out_dir else None   # read by every rank
    if init_from is not None and not (resume and source.checkpoint() is not None):
        model.load_state_dict(initial_weights(init_from, model_cfg))
    if parallel.rank:
        torch.manual_seed(cfg.seed + 7919 * parallel.rank)   # dropout masks of its own
    # Under FSDP2 each block is compiled alone (see wrap); otherwise the whole loss below.
    compile_blocks = parallel.sharded and use_compile
    net = parallel.wrap(model, compile_blocks={"mode": cfg.compile_mode} if compile_blocks
                        else None)
    opt = make_optimizer(model, cfg, device, graphed=use_graph)
    sampler = make_feed(dataset.train, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                        seed=cfg.seed, device=device, on_device=cfg.data_on_device,
                        share=(parallel.rank, parallel.world_size))
    info["data_feed"] = sampler.kind
    val_x, val_y = fixed_windows(dataset.val, cfg.eval_batches * cfg.batch_size, cfg.seq_len,
                                 device)
    step, curves, best = 0, [], (math.inf, None)
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)        # MoE auxiliary loss since the last evaluation
    loss_n = 0
    state = (restore(source, model, opt, cfg, device, dataset.describe(),
                     load=parallel.load_state, rank=parallel.rank) if resume else None)
    parallel.barrier()                     # every rank has read the checkpoint it resumes from
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
        if run is not None:
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
            logits, aux = net(x, return_aux=True)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), aux

    # The compiled function takes the loss in with the model, so inductor fuses the last matmul's
    # epilogue and the cross-entropy. Evaluation stays eager: compiling it would cost a second
    # graph's compile time for a few dozen batches.
    whole = use_compile and not compile_blocks
    step_loss = torch.compile(loss_fn, mode=cfg.compile_mode) if whole else loss_fn

    reporter = Reporter(cfg.steps, step, label=label,
                        bar=main and (cfg.progress if cfg.progress is not None
                                      else sys.stderr.isatty()),
                        log=main and (cfg.log if cfg.log is not None else not sys.stderr.isatty()))
    tokens_per_step = cfg.batch_size * cfg.seq_len
    # Steady-state timing starts after a few steps (compilation, allocator warm-up) and excludes
    # evaluation; the clock is read only where the loop synchronises anyway.
    warm_until = step + min(10, max(1, (cfg.steps - step) // 10))
    timed_s, timed_steps, t_mark = 0.0, 0, None
    params = [p for p in model.parameters() if p.requires_grad]
    step_t = torch.tensor(step, device=device)     # the step counter the sampler reads
    watch = FiniteWatch(device)
    where = source.checkpoint_path if source is not None else None

    def check_finite():
        parallel.agree_on_first(watch)     # one rank's NaN stops every rank, with one message
        watch.check(kept_step=kept_step, where=where)

    def one_step():
        """A whole optimizer step with no host synchronisation, so it can be captured."""
        x, y = sampler.batch(step_t)       # this process's share of the step's batch
        opt.zero_grad(set_to_none=not use_graph)   # a graph needs its gradients to stay put
        pieces = list(zip(x.chunk(cfg.grad_accum), y.chunk(cfg.grad_accum)))
        for i, (xm, ym) in enumerate(pieces):
            # Equal micro-batches, each mean loss over grad_accum: the gradients add up to those
            # of the share's mean loss, and the processes' average (taken in the last
            # micro-step's backward) to those of the whole batch's.
            with parallel.micro_step(last=i == len(pieces) - 1):
                loss, aux = step_loss(xm, ym)
                ((loss + aux) / cfg.grad_accum).backward()
            watch.note(loss, 0, step_t)
            loss_sum.add_(loss.detach() / cfg.grad_accum)
            aux_sum.add_(aux.detach() / cfg.grad_accum)
        if cfg.grad_clip > 0:
            norm = parallel.clip_grad_norm(params, cfg.grad_clip, foreach=cuda)
            watch.note(norm, 1, step_t)
        opt.step()
        step_t.add_(1)

    def save(result: Optional[dict] = None):
        """Every rank takes part (state gathered, sums agreed); rank 0 writes."""
        nonlocal kept_step
        check_finite()    # never a checkpoint of weights trained on a non-finite loss
        for total in (loss_sum, aux_sum):
            parallel.mean_(total)      # the sums since the last evaluation, over all ranks
        weights, optimizer = parallel.model_state(model), parallel.optimizer_state(model, opt)
        rng = parallel.gather((torch.get_rng_state(),
                               torch.cuda.get_rng_state(device) if cuda else None))
        if run is not None:
            state = {"optimizer": optimizer, "step": step, "curves": curves, "best": list(best),
                     "loss_sum": loss_sum.item(), "loss_n": loss_n, "aux_sum": aux_sum.item(),
                     "rng_cpu": rng[0][0], "rng_cuda": rng[0][1]}
            if rng[1:]:
                state["rng_ranks"] = rng[1:]     # ranks 1.. (their dropout masks)
            if result is not None:
                state["result"] = result
            run.save(model, tokenizer=dataset.tokenizer, train_state=state, state_dict=weights,
                     meta={"train": cfg.to_dict(), "budget": budget, "step": step,
                           "dataset": dataset.describe(), "final": result is not None,
                           **parallel.describe()})
            run.write("curves.jsonl", curves_bytes(curves))
        parallel.barrier()            # the others wait while rank 0 writes
        kept_step = step

    # With CUDA graphs, the first steps run normally on a side stream (compilation, lazy optimizer
    # state) and are real training steps; then one step is captured and replayed from there on, so
    # a step costs one launch instead of hundreds.
    graph, graph_from = None, step + 3
    side = torch.cuda.Stream(device) if use_graph else None
    t_start = time.perf_counter()
    t_interval, interval_from = t_start, step      # the log line's ms/step: since the last one
    net.train()
    while step < cfg.steps:
        lr = set_lr(opt, lr_at(step, cfg))
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
            for total in (loss_sum, aux_sum):
                parallel.mean_(total)
            train_loss = loss_sum.item() / loss_n   # the one host sync between evaluations
            check_finite()
            now = time.perf_counter()
            if t_mark is not None:
                timed_s += now - t_mark
                timed_steps += step - mark_step
            val_loss, val_acc, expert_load = evaluate(model, val_x, val_y, autocast,
                                                      micro_batch=cfg.micro_batch,
                                                      parallel=parallel)
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
        if source is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 \
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
    check_finite()
    timing = {"wall_s": time.perf_counter() - t_start, "timed_s": timed_s,
              "timed_steps": timed_steps}
    info["peak_memory_bytes"] = _peak_memory(device, parallel)
    result = _result(model, cfg, budget, dataset, info, curves, best, label, timing=timing)
    if source is not None:
        save(result)
    if run is not None:
        run.write("result.json", (json.dumps(result, indent=2) + "\n").encode())
    model.check_ids = True
    return {**result, "model": model}


def _peak_memory(device: torch.device, parallel: Parallel) -> Optional[int]:
    """The most memory this run's tensors held at once on one device (bytes): CUDA's
    max_memory_allocated since the run started, the largest over the ranks; None off CUDA."""
    if device.type != "cuda":
        return None
    peak = torch.tensor(float(torch.cuda.max_memory_allocated(device)), device=device)
    return int(parallel.max_(peak).item())


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
    peak = info["peak_tflops"]     # of one device; the run has world_size of them
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
        "world_size": info["world_size"], "parallel": info["parallel"],
        "process_group_backend": info["process_group_backend"],
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
        "mfu": achieved / (peak * info["world_size"]) if achieved and peak else None,
        "peak_memory_bytes": info.get("peak_memory_bytes"),     # per device, max over ranks
        "run_record": run_record(info["device"]),
    }
