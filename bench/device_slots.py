"""Device slots: how the runs of a grid share one GPU. K runs train at once (K > 1 pays off under
CUDA MPS, bench/mps.py); each run's step time is still measured alone, in a short window during
which it holds every slot while the others wait; a wall-time deadline stops runs that cannot
finish in time. The parent of a grid and its worker processes share one Coordinator.

The protocol (no deadlock: whoever waits on the gate holds no slot):
- a run takes a slot through the gate when its step is compiled and captured, and keeps it;
- a run that wants its timing window announces it (`wanted`), gives its slot back, takes the gate
  and then all K slots; runs holding a slot see the announcement at their next step, drain their
  GPU work, give the slot back and queue on the gate for it again;
- after the window the run gives back all but one slot, then the gate."""

from __future__ import annotations

import statistics
import time
from typing import Optional


class SkipRun(Exception):
    """The run cannot finish before the grid's deadline: not started, recorded as skipped."""


class Coordinator:
    """What a grid's processes share: the slot semaphore (None with one run at a time and no
    packing), the gate of the timing windows, what each worker position holds (so the parent can
    take back what a crashed worker held), the deadline (time.time() seconds, or None) and, per
    estimate key, how long a run has held its slot so far at most (the guard's estimate)."""

    def __init__(self, ctx, *, slots: Optional[int], positions: int,
                 deadline: Optional[float] = None, estimates: tuple = (0.0,)):
        self.slots = slots
        self.sem = ctx.Semaphore(slots) if slots else None
        self.gate = ctx.Lock()      # a plain Lock: the parent may release it for a dead worker
        self.wanted = ctx.Value("i", 0, lock=True)
        self.held = ctx.Array("i", positions)
        self.gated = ctx.Array("b", positions)
        self.wanting = ctx.Array("b", positions)
        self.deadline = deadline
        self.estimates = ctx.Array("d", list(estimates) or [0.0])
        self.me = 0                 # this process's worker position (set in each worker)

    @property
    def packed(self) -> bool:
        """More than one run trains at once: step times need their own window."""
        return bool(self.slots and self.slots > 1)

    # -- the deadline ---------------------------------------------------------------------------
    def estimate(self, key: int) -> float:
        return self.estimates[key]

    def record_estimate(self, key: int, held_s: float) -> None:
        if held_s and held_s > self.estimates[key]:
            self.estimates[key] = held_s

    def fits(self, key: int, extra_s: float = 0.0) -> bool:
        """Whether a run of this key, `extra_s` from now plus its estimated slot time, ends
        before the deadline."""
        return self.deadline is None or (time.time() + extra_s + self.estimates[key]
                                          <= self.deadline)

    # -- slots, worker side ---------------------------------------------------------------------
    def take_slot(self) -> None:
        with self.gate:
            self.sem.acquire()
            self.held[self.me] += 1

    def give_slot(self) -> None:
        self.held[self.me] -= 1
        self.sem.release()

    def someone_waits(self) -> bool:
        return self.wanted.value > 0

    def enter_exclusive(self) -> None:
        """Hold every slot (called while holding one)."""
        with self.wanted.get_lock():
            self.wanted.value += 1
        self.wanting[self.me] = 1
        self.give_slot()
        self.gate.acquire()
        self.gated[self.me] = 1
        for _ in range(self.slots):
            self.sem.acquire()
            self.held[self.me] += 1

    def leave_exclusive(self) -> None:
        """Back to one slot."""
        for _ in range(self.slots - 1):
            self.give_slot()
        with self.wanted.get_lock():
            self.wanted.value -= 1
        self.wanting[self.me] = 0
        self.gated[self.me] = 0
        self.gate.release()

    # -- parent side ----------------------------------------------------------------------------
    def reclaim(self, position: int) -> None:
        """Give back what the (dead) worker at `position` held."""
        for _ in range(self.held[position]):
            self.sem.release()
        self.held[position] = 0
        if self.wanting[position]:
            with self.wanted.get_lock():
                self.wanted.value -= 1
            self.wanting[position] = 0
        if self.gated[position]:
            self.gated[position] = 0
            self.gate.release()


def _sync(cuda: bool) -> None:
    if cuda:
        import torch
        torch.cuda.synchronize()


class RunHooks:
    """The trainer's `on_ready` and per-step `callback` for one run: take a slot when ready
    (SkipRun when the deadline cannot be met), yield the slot while another run times itself,
    and, when runs are packed, time up to `SUB_WINDOWS` stretches of steps alone (fewer where
    evaluations come close together; the median is the
    run's isolated ms/step). Then `finish()` gives back whatever is held."""

    CALIBRATION_STEPS = 3
    SUB_WINDOWS = 3
    SUB_WINDOW_S = 0.08            # each stretch: about this long, and at least MIN_STEPS steps
    MIN_STEPS = 5

    def __init__(self, coord: Optional[Coordinator], *, key: int, steps: int, eval_every: int,
                 cuda: bool):
        self.coord, self.key, self.steps, self.eval_every, self.cuda = (
            coord, key, steps, eval_every, cuda)
        self.holding = self.exclusive = False
        self.t_ready = self.t_released = None
        self.wait_s = self.yielded_s = self.exclusive_s = 0.0
        self.window: Optional[dict] = None      # the timing window in progress
        self.sub_ms: list[float] = []           # ms/step of each finished stretch
        self.window_from = None                 # first step a window may start at
        self.window_done = not (coord is not None and coord.packed)
        self.windows_at: list = []              # (start, end) of each exclusive window, time()
        self.eval_at: dict = {}                 # step -> time() when its evaluation was done

    # -- the trainer's hooks --------------------------------------------------------------------
    def on_ready(self) -> None:
        t = time.time()
        if self.coord is not None and self.coord.sem is not None:
            self.coord.take_slot()
            self.holding = True
        self.t_ready = time.time()
        self.wait_s = self.t_ready - t
        if self.coord is not None and not self.coord.fits(self.key):
            raise SkipRun(f"its estimated {self.coord.estimate(self.key):.0f} s on the device "
                          "would end past the deadline (--max-minutes)")

    def callback(self, step: int) -> None:
        if step % self.eval_every == 0 or step == self.steps:
            self.eval_at[step] = time.time()    # the learning curve against the wall clock
        if not self.holding:
            return
        if self.window_from is None:
            self.window_from = step + 2         # a couple of replays before timing
        if self.window is not None:
            self._advance_window(step)
        elif not self.window_done and step >= self.window_from:
            self._start_window(step)
        elif self.coord.someone_waits() and not self.exclusive:
            _sync(self.cuda)                    # drain this run's queued work first
            t = time.time()
            self.coord.give_slot()
            self.coord.take_slot()
            self.yielded_s += time.time() - t

    def finish(self) -> None:
        if self.exclusive:
            self._close_window()
        if self.holding and self.coord is not None and self.coord.sem is not None:
            self.coord.give_slot()
        self.holding = False
        self.t_released = time.time()

    # -- the timing window ----------------------------------------------------------------------
    def _next_eval(self, step: int) -> int:
        return min(self.steps, (step // self.eval_every + 1) * self.eval_every)

    def _start_window(self, step: int) -> None:
        # The evaluation at the next eval step runs before that step's callback: a stretch must
        # end one step before it.
        room = self._next_eval(step) - 1 - step
        if room < self.CALIBRATION_STEPS + self.MIN_STEPS:
            if self._next_eval(step) >= self.steps:
                self.window_done = True         # no room left before the end: give up
            else:
                self.window_from = self._next_eval(step) + 1
            return
        t = time.time()
        self.coord.enter_exclusive()
        self.exclusive = True
        self.exclusive_s -= t                   # counted from asking, so waits are included
        _sync(self.cuda)
        self.windows_at.append([time.time(), None])
        self.window = {"mark_step": step, "mark_t": time.perf_counter(), "length": None,
                       "end": self._next_eval(step)}

    def _advance_window(self, step: int) -> None:
        w = self.window
        if w["length"] is None:
            if step - w["mark_step"] < self.CALIBRATION_STEPS:
                return
            _sync(self.cuda)
            now = time.perf_counter()
            per_step = (now - w["mark_t"]) / (step - w["mark_step"])
            room = w["end"] - 1 - step
            w["count"] = max(1, min(self.SUB_WINDOWS, room // self.MIN_STEPS))
            w["length"] = max(1, min(room // w["count"], max(
                self.MIN_STEPS, round(self.SUB_WINDOW_S / max(per_step, 1e-9)))))
            w.update(mark_step=step, mark_t=now)
            return
        if step - w["mark_step"] < w["length"]:
            return
        _sync(self.cuda)
        now = time.perf_counter()
        self.sub_ms.append(1e3 * (now - w["mark_t"]) / (step - w["mark_step"]))
        w.update(mark_step=step, mark_t=now)
        if len(self.sub_ms) >= w["count"]:
            self._close_window()

    def _close_window(self) -> None:
        self.windows_at[-1][1] = time.time()
        self.coord.leave_exclusive()
        self.exclusive = False
        self.exclusive_s += time.time()
        self.window, self.window_done = None, True

    # -- what the run records -------------------------------------------------------------------
    def stats(self) -> dict:
        held = (self.t_released - self.t_ready) if self.t_ready and self.t_released else None
        return {"slot_wait_s": self.wait_s, "held_s": held, "yielded_s": self.yielded_s,
                "ready_at": self.t_ready, "released_at": self.t_released,
                "windows_at": list(self.windows_at),
                "exclusive_s": self.exclusive_s if self.sub_ms else 0.0,
                "window_ms": list(self.sub_ms),
                "alone_ms_per_step": statistics.median(self.sub_ms) if self.sub_ms else None}
