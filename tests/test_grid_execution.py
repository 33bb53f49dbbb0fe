"""The grid machinery every benchmark trains through (bench.execution, bench.device_slots): a run
that raises or whose worker dies is recorded and the grid goes on; the wall-time guard skips what
cannot end in time; packed runs time themselves alone, with no other run stepping inside their
window; and the classification of failures."""

import multiprocessing

import grid_tasks
from bench import execution
from bench.device_slots import Coordinator, RunHooks


def test_a_failed_or_crashed_run_is_recorded_and_the_grid_goes_on():
    specs = [{"do": d} for d in ("ok", "raise", "ok", "die", "ok", "ok")]
    seen = []
    records = execution.run_grid(grid_tasks.behave, specs, {}, jobs=2, slots=1,
                                 on_record=lambda spec, r: seen.append((spec["do"], r["status"])))
    assert [r["status"] for r in records] == ["ok", "failed", "ok", "failed", "ok", "ok"]
    assert records[1]["failure"] == "out of memory" and "2.00 GiB" in records[1]["error"]
    assert records[3]["failure"] == "crash" and "exit code 3" in records[3]["error"]
    assert sorted(seen) == sorted(zip([s["do"] for s in specs], [r["status"] for r in records]))
    # A worker retires after a failure, so the runs after it ran in fresh processes.
    assert len({r["pid"] for r in records if r["status"] == "ok"}) >= 2


def test_the_guard_skips_what_cannot_end_before_the_deadline():
    import time
    specs = [{"do": "ok", "gpu_s": 100.0}] * 3
    # Nothing known yet: the first run starts; it took 100 s, so with 50 s left none follows.
    records = execution.run_grid(grid_tasks.behave, specs, {}, jobs=1,
                                 deadline=time.time() + 50)
    assert [r["status"] for r in records] == ["ok", "skipped", "skipped"]
    assert "deadline" in records[1]["reason"]
    # An earlier part's estimate holds from the start; no deadline, no guard.
    records = execution.run_grid(grid_tasks.behave, specs, {}, jobs=1,
                                 deadline=time.time() + 50, estimates=[60.0])
    assert {r["status"] for r in records} == {"skipped"}
    records = execution.run_grid(grid_tasks.behave, specs, {}, jobs=1, estimates=[1e9])
    assert {r["status"] for r in records} == {"ok"}


def test_packed_runs_time_a_window_alone_and_nobody_steps_inside_it():
    specs = [{"steps": 120, "eval_every": 60}] * 4
    records = execution.run_grid(grid_tasks.stepper, specs, {}, jobs=3, slots=2)
    assert all(r["status"] == "ok" for r in records)
    for i, r in enumerate(records):
        st = r["step_time"]
        assert len(st["window_ms"]) == RunHooks.SUB_WINDOWS and st["alone_ms_per_step"] >= 2
        (start, end), = st["windows_at"]
        for j, other in enumerate(records):
            if j != i:
                assert not any(a < end and b > start for a, b in other["steps"]), (i, j)
    # Two slots: at some moment two runs were stepping at once.
    spans = [(r["steps"][0][0], r["steps"][-1][1]) for r in records]
    assert any(a0 < b1 and b0 < a1 for k, (a0, a1) in enumerate(spans)
               for (b0, b1) in spans[k + 1:])


def test_a_window_fits_between_evaluations_or_is_not_taken():
    coord = Coordinator(multiprocessing.get_context("spawn"), slots=2, positions=1)
    hooks = RunHooks(coord, key=0, steps=12, eval_every=4, cuda=False)
    hooks.on_ready()
    for step in range(1, 13):
        hooks.callback(step)
    hooks.finish()
    st = hooks.stats()
    # 3 steps between evaluations cannot hold a calibration and a stretch: no window, and every
    # slot back.
    assert st["window_ms"] == [] and st["alone_ms_per_step"] is None
    assert coord.held[0] == 0 and coord.sem.get_value() == 2 and coord.wanted.value == 0


def test_the_parent_takes_back_what_a_dead_worker_held():
    coord = Coordinator(multiprocessing.get_context("spawn"), slots=2, positions=2)
    coord.me = 1
    coord.take_slot()
    coord.enter_exclusive()          # holds both slots, the gate and an announcement
    coord.reclaim(1)
    assert coord.sem.get_value() == 2 and coord.wanted.value == 0
    assert coord.gate.acquire(timeout=1)


def test_failures_are_named_as_the_sweeps_name_them():
    from sqt.divergence import NonFiniteLoss
    nan = NonFiniteLoss(what="training loss", value=float("nan"), step=12, kept_step=None,
                        where=None)
    cases = [(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), "out of memory",
              None), (nan, "non-finite loss", 12), (ValueError("shape mismatch"), "error", None)]
    for exc, kind, step in cases:
        r = execution.failed_record(exc)
        assert (r["status"], r["failure"], r["failed"]["kind"], r["failed"]["step"]) == (
            "failed", kind, kind, step)
        assert type(exc).__name__ in r["error"]


def test_a_terminated_grid_ends_its_workers(tmp_path):
    """A time limit's SIGTERM to the grid's process leaves no worker running on the device."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    pidfile = tmp_path / "pids"
    code = ("import sys, grid_tasks; from bench import execution; "
            "execution.run_grid(grid_tasks.sleeper, [{'pidfile': sys.argv[1]}] * 2, {}, jobs=2)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    proc = subprocess.Popen([sys.executable, "-c", code, str(pidfile)], env=env)
    deadline = time.time() + 60
    while time.time() < deadline and (not pidfile.exists()
                                      or len(pidfile.read_text().split()) < 2):
        time.sleep(0.1)
    workers = [int(p) for p in pidfile.read_text().split()]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    time.sleep(0.5)

    def running(pid: int) -> bool:      # a zombie has ended; init reaps it
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except FileNotFoundError:
            return False
    assert not any(running(pid) for pid in workers)
