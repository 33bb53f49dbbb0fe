"""Running a grid of training runs, shared by bench.sweep, bench.layer_sweep and bench.quality:
worker processes that compile side by side and train through device slots (bench/device_slots.py),
a wall-time guard, and one record per run whatever becomes of it — trained ("ok"), failed (an
exception, a non-finite loss, out of memory, a worker process that died) or skipped by the guard.
A failed run is recorded and the grid goes on. This module imports torch only inside a run."""

from __future__ import annotations

import contextlib
import gc
import signal
import time
import traceback
from collections import deque
from typing import Callable, Optional

from .device_slots import Coordinator, RunHooks, SkipRun
from .gpus import pin_to_gpu

_COORD: Optional[Coordinator] = None     # the grid's coordinator, in this process
_TASK_START = None                       # when this process was handed its current run


def _failed(failed: dict, error: str, **more) -> dict:
    # `failed` is the sweep summary's shape (kind, reason, step); `failure`/`error` the grid's.
    return {"status": "failed", "failure": failed["kind"], "error": error, "failed": failed,
            **more}


def failed_record(exc: BaseException) -> dict:
    """A run that raised: a non-finite loss or memory that ran out as bench.common.failure_of
    names them (the one classifier of the sweeps), anything else as an error with its
    traceback. Unlike a lone sweep, a grid records that too and goes on: one bad run must not
    cost the GPU time of the others."""
    from .common import failure_of
    error = f"{type(exc).__name__}: {exc}"
    failed = failure_of(exc) or {"kind": "error", "reason": error.splitlines()[0][:300],
                                 "step": None}
    return _failed(failed, error[:2000], traceback=traceback.format_exc(limit=8)[-4000:])


def crash_record(exitcode: int) -> dict:
    how = (f"signal {signal.Signals(-exitcode).name}" if exitcode < 0 and
           -exitcode in signal.valid_signals() else f"exit code {exitcode}")
    why = f"the worker process ended ({how}) during the run"
    return _failed({"kind": "crash", "reason": why, "step": None}, why)


def skipped_record(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def train_run(model_cfg, train_cfg, data, *, label: str, key: int = 0,
              peak_tflops: Optional[float] = None,
              after: Optional[Callable[[object, dict], dict]] = None) -> dict:
    """Train one run of a grid and return its record; a failure is recorded, never raised
    (SkipRun, from the deadline, propagates to the grid). `after(model, result)` runs while the
    run still holds its device slot and returns fields to add (a benchmark's samples).

    The record's `ms_per_step` is the step time alone: the whole run's when runs train one at a
    time, the timing window's median when they are packed (None when no window fitted); the
    packed figure and the slot times are under `step_time`. tokens/s, TFLOP/s and MFU follow the
    alone figure."""
    from sqt.train import train
    from sqt.utils import resolve_device
    resolved = train_cfg.resolve(len(data.train))
    cuda = resolve_device(train_cfg.device).type == "cuda"
    coord = _COORD
    hooks = RunHooks(coord, key=key, steps=resolved.steps, eval_every=resolved.eval_every,
                     cuda=cuda)
    if cuda or train_cfg.compile:
        _fresh_compiler()
    try:
        result = train(model_cfg, train_cfg, data, peak_tflops=peak_tflops, label=label,
                       on_ready=hooks.on_ready, callback=hooks.callback)
        model = result.pop("model")
        if after is not None:
            result.update(after(model, result))
        del model
    except SkipRun:
        raise
    except Exception as e:  # recorded: the grid goes on without this run
        hooks.finish()
        return {**failed_record(e), "label": label, "step_time": hooks.stats()}
    finally:   # also after a failure or a skip: give back the slot, the gate, the memory
        hooks.finish()
        _release_memory(cuda)
    return {**result, "status": "ok", **_alone_figures(result, hooks, coord, resolved)}


def _alone_figures(result: dict, hooks: RunHooks, coord, resolved) -> dict:
    stats = hooks.stats()
    packed = coord is not None and coord.packed
    whole = result["ms_per_step"]
    if packed:
        alone, source = stats["alone_ms_per_step"], (
            f"median of {len(stats['window_ms'])} stretches timed while holding every slot"
            if stats["window_ms"] else "not measured: no timing window fitted")
    else:
        alone, source = whole, "the whole run, one run training at a time"
    for point in result["curves"]:     # wall seconds since the run was ready to train
        at = hooks.eval_at.get(point["step"])
        point["wall_s"] = round(at - hooks.t_ready, 3) if at and hooks.t_ready else None
    tokens = resolved.batch_size * resolved.seq_len
    achieved = result["train_flops_per_step"] / (alone * 1e-3) / 1e12 if alone else None
    started = _TASK_START or hooks.t_ready
    return {
        "ms_per_step": alone,
        "tokens_per_s": tokens / (alone * 1e-3) if alone else None,
        "achieved_tflops": achieved,
        "mfu": achieved / result["peak_tflops"] if achieved and result.get("peak_tflops") else None,
        "gpu_s": stats["held_s"],       # holding a device slot: training, evaluation, `after`
        # from being handed the run to being ready to train, less the wait for a slot: the
        # preparation (data, model, compilation, capture) that the guard adds before a run
        "setup_s": (hooks.t_ready - started - stats["slot_wait_s"]) if hooks.t_ready else None,
        "step_time": {**stats, "alone_source": source, "packed_ms_per_step": whole if packed
                      else None, "device_slots": coord.slots if coord is not None else None},
    }


def _fresh_compiler() -> None:
    """Forget the previous run's compiled frames: a worker trains many models through the same
    function, and past dynamo's cache limit it would silently train the next ones eagerly."""
    import torch._dynamo
    torch._dynamo.reset()


def _release_memory(cuda: bool) -> None:
    """Return the finished run's memory to the device, for the runs beside it (dynamo's cache
    holds the compiled step, and through it the model)."""
    if cuda:
        _fresh_compiler()
    gc.collect()
    if cuda:
        import torch
        torch.cuda.empty_cache()


def _attempt(task, spec: dict, common: dict) -> dict:
    global _TASK_START
    _TASK_START = time.time()
    try:
        return task(spec, common)
    except SkipRun as e:
        return skipped_record(str(e))
    except Exception as e:  # a task's own failure outside training (data, config): recorded
        return failed_record(e)


def _worker_main(position: int, coord: Coordinator, conn, task, common,
                 gpu: Optional[int] = None) -> None:
    """Take (index, spec) from the parent's end of `conn`, send back (index, record). With `gpu`,
    the worker first makes that GPU its only device (before CUDA starts here)."""
    global _COORD
    if gpu is not None:
        pin_to_gpu(gpu)
    coord.me = position
    _COORD = coord
    while True:
        try:
            item = conn.recv()
        except EOFError:      # the parent is gone
            return
        if item is None:
            return
        index, spec = item
        record = _attempt(task, spec, common)
        conn.send((index, record))
        if record.get("status") == "failed":
            # An error may leave the CUDA context unusable (a device-side assert, a fragmented
            # allocator after running out of memory): this worker retires, a fresh one follows.
            return


def run_grid(task, specs: list[dict], common: dict, *, jobs: int, slots: Optional[int] = None,
             gpus: Optional[list[int]] = None, deadline: Optional[float] = None, estimates=(0.0,), ready_estimates=None,
             on_record: Optional[Callable[[dict, dict], None]] = None) -> list[dict]:
    """Run `task(spec, common) -> record` for every spec and return the records in spec order.

    jobs: worker processes (spawned; CUDA cannot fork), each taking the next spec when free; 1
        runs every spec in this process, one after another.
    slots: runs that train at once on the device (None: no slots, every ready run trains).
    gpus: one GPU index per worker (jobs == len(gpus)); worker i is pinned to gpus[i], and a
        worker that replaces it after a failure to the same GPU.
    deadline: time.time() by which every run must end; a spec whose estimated time no longer
        fits is skipped, here before it starts, or in its worker when it is ready to train.
    estimates: per `spec["key"]`, the longest a run of that key has held its slot so far
        (earlier parts of the grid); finished runs raise it. ready_estimates: likewise, the
        setup before a run is ready to train (data, model, compilation, capture). A run is
        handed out while setup plus slot time still fit; its worker checks again once the run
        holds its slot, which is when the queue for the device is known.
    on_record(spec, record): called here, in the parent, as each record arrives."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    coord = Coordinator(ctx, slots=slots, positions=max(1, jobs), deadline=deadline,
                        estimates=tuple(estimates))
    ready = list(ready_estimates or [0.0] * len(coord.estimates))   # per key: setup time
    records: list = [None] * len(specs)

    def finish(index: int, record: dict) -> None:
        key = specs[index].get("key", 0)
        if record.get("status") == "ok":
            coord.record_estimate(key, record.get("gpu_s") or 0.0)
            ready[key] = max(ready[key], record.get("setup_s") or 0.0)
        records[index] = record
        if on_record is not None:
            on_record(specs[index], record)

    def fits(index: int) -> bool:
        key = specs[index].get("key", 0)
        if coord.fits(key, extra_s=ready[key]):
            return True
        finish(index, skipped_record(
            f"its estimated {ready[key] + coord.estimate(key):.0f} s would end past the "
            "deadline (--max-minutes)"))
        return False

    with _exit_on_sigterm():
        if jobs <= 1 and not gpus:
            global _COORD
            saved, _COORD = _COORD, coord
            try:
                for i, spec in enumerate(specs):
                    if fits(i):
                        finish(i, _attempt(task, spec, common))
            finally:
                _COORD = saved
            return records
        _Pool(ctx, coord, task, common, jobs, gpus).run(specs, fits, finish)
    return records


@contextlib.contextmanager
def _exit_on_sigterm():
    """A termination request (a time limit's SIGTERM) unwinds the grid like Ctrl-C: workers are
    ended rather than left orphaned on the GPU, and an MPS daemon around the grid is told to
    quit. (Only the main thread may set a handler; elsewhere nothing changes.)"""
    def stop(signum, frame):
        raise SystemExit(128 + signum)
    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Pool:
    """Worker processes fed one spec at a time, each through its own pipe (so a worker that dies
    mid-message blocks nobody else). A worker that dies mid-run leaves a 'crash' record; what it
    held (device slots, the gate) is taken back and a fresh worker replaces it."""

    POLL_S = 1.0

    def __init__(self, ctx, coord: Coordinator, task, common: dict, jobs: int,
                 gpus: Optional[list[int]] = None):
        self.ctx, self.coord, self.task, self.common, self.jobs = ctx, coord, task, common, jobs
        self.gpus = gpus
        self.procs, self.conns, self.busy, self.idle = {}, {}, {}, set()

    def spawn(self, position: int) -> None:
        mine, theirs = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker_main, daemon=True, args=(
            position, self.coord, theirs, self.task, self.common,
            self.gpus[position] if self.gpus else None))
        proc.start()
        theirs.close()                  # the worker's end lives in the worker only
        self.procs[position], self.conns[position] = proc, mine
        self.idle.add(position)

    def run(self, specs: list, fits, finish) -> None:
        from multiprocessing.connection import wait
        pending = deque(range(len(specs)))
        for position in range(min(self.jobs, len(specs))):
            self.spawn(position)
        finished = False
        try:
            while pending or self.busy:
                for position in sorted(self.idle):
                    while pending and not fits(pending[0]):
                        pending.popleft()
                    if not pending:
                        break
                    index = pending.popleft()
                    self.idle.discard(position)
                    try:
                        self.conns[position].send((index, specs[index]))
                    except OSError:             # it has just ended: the spec waits for another
                        pending.appendleft(index)
                        continue
                    self.busy[position] = index
                if not self.busy:
                    break
                by_conn = {id(c): p for p, c in self.conns.items()}
                for conn in wait(list(self.conns.values()), timeout=self.POLL_S):
                    self.receive(by_conn[id(conn)], finish, bool(pending))
            finished = True
        finally:
            self.stop(graceful=finished)

    def receive(self, position: int, finish, more: bool) -> None:
        """A record from the worker at `position`, or its end."""
        try:
            index, record = self.conns[position].recv()
        except (EOFError, OSError):     # it ended: take back what it held, replace it
            proc = self.procs.pop(position)
            self.conns.pop(position).close()
            proc.join(timeout=10)
            self.coord.reclaim(position)
            self.idle.discard(position)
            if position in self.busy:
                finish(self.busy.pop(position), crash_record(proc.exitcode or -1))
            if more:
                self.spawn(position)
            return
        self.busy.pop(position, None)
        if record.get("status") != "failed":    # after a failure the worker is ending
            self.idle.add(position)
        finish(index, record)

    def stop(self, graceful: bool) -> None:
        """Idle workers end when told; after an interruption every worker is ended at once."""
        for position, proc in self.procs.items():
            if proc.is_alive() and graceful:
                try:
                    self.conns[position].send(None)
                except OSError:
                    pass
            elif proc.is_alive():
                proc.terminate()
        deadline = time.time() + 30
        for proc in self.procs.values():
            proc.join(timeout=max(0.1, deadline - time.time()))
            if proc.is_alive():
                proc.terminate()
