"""Stand-in runs for the grid tests: importable by name, so spawned worker processes can unpickle
them, and free of torch, so a worker starts in a fraction of a second."""

from __future__ import annotations

import os
import time

from bench import execution
from bench.device_slots import RunHooks


def behave(spec: dict, common: dict) -> dict:
    """ok, raise, or kill the worker process, as the spec says."""
    if spec["do"] == "raise":
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    if spec["do"] == "die":
        os._exit(3)
    return {"status": "ok", "pid": os.getpid(), "gpu_s": spec.get("gpu_s", 0.01),
            "setup_s": 0.0}


def stepper(spec: dict, common: dict) -> dict:
    """A run of `steps` 2 ms steps through the trainer's hooks, recording when each step ran."""
    hooks = RunHooks(execution._COORD, key=0, steps=spec["steps"], eval_every=spec["eval_every"],
                     cuda=False)
    steps = []
    try:
        hooks.on_ready()         # compiled and captured: from here on it needs the device
        for step in range(1, spec["steps"] + 1):
            t = time.time()
            time.sleep(0.002)
            steps.append((t, time.time()))
            hooks.callback(step)
    finally:
        hooks.finish()
    return {"status": "ok", "gpu_s": hooks.stats()["held_s"], "steps": steps,
            "step_time": hooks.stats()}


def sleeper(spec: dict, common: dict) -> dict:
    """Say which process runs it, then take far longer than any test waits."""
    with open(spec["pidfile"], "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(120)
    return {"status": "ok"}


def visible_gpus(spec: dict, common: dict) -> dict:
    """The GPUs this worker may see, and who it is (a --gpus grid pins each worker to one)."""
    return {"status": "ok", "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}
