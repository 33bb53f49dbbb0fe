"""CUDA MPS for a grid, only when asked (`--mps`): processes on one GPU are time-sliced, so small
runs packed side by side only overlap under the Multi-Process Service. The daemon is started with
its pipe and log folders in a temporary folder of ours, checked with one client, and told to quit
when the grid ends. No GPU setting (compute mode, clocks) is touched. The status is recorded."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"
ENV = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")
PROBE = ("import torch; x = torch.ones(1 << 20, device='cuda'); "
         "print(torch.cuda.get_device_name(), float((x * 2).sum()))")


def _control(binary: str, env: dict, command: str, timeout: float = 15.0) -> str:
    done = subprocess.run([binary], input=command + "\n", env=env, capture_output=True,
                          text=True, timeout=timeout)
    return (done.stdout + done.stderr).strip()


def _quit(binary: str, env: dict) -> str:
    try:
        return _control(binary, env, "quit")
    except (OSError, subprocess.SubprocessError) as e:
        return f"quit failed: {e}"


@contextlib.contextmanager
def mps_daemon(enabled: bool, *, log=print):
    """Run the body with an MPS daemon serving the worker processes spawned in it, when `enabled`
    and the control binary exists. This process should make its own CUDA context before (it then
    stays a plain client, so the daemon can quit when the workers have ended). Yields a status
    dict: requested, running, and why not or the server's pid; at exit, what quitting said."""
    status = {"requested": bool(enabled), "running": False}
    if not enabled:
        yield status
        return
    binary = shutil.which(CONTROL)
    if binary is None:
        status["error"] = f"{CONTROL} not found on PATH: runs share the GPU time-sliced"
        log(f"mps: {status['error']}")
        yield status
        return
    folder = Path(tempfile.gettempdir()) / f"sqt-mps-{os.getuid()}"
    env = {**os.environ, ENV[0]: str(folder), ENV[1]: str(folder / "log")}
    saved = {k: os.environ.get(k) for k in ENV}
    if (folder / "control").exists():
        _quit(binary, env)        # a daemon of ours left by a killed grid: start clean
    (folder / "log").mkdir(parents=True, exist_ok=True)
    started = False
    try:
        done = subprocess.run([binary, "-d"], env=env, capture_output=True, text=True,
                              timeout=30)
        started = done.returncode == 0
        if not started:
            raise RuntimeError(f"{CONTROL} -d exited with {done.returncode}: "
                               f"{(done.stdout + done.stderr).strip()[:300]}")
        probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                               text=True, timeout=180)
        if probe.returncode != 0:
            raise RuntimeError("a CUDA client could not run under the daemon: "
                               + (probe.stdout + probe.stderr).strip()[-400:])
        servers = _control(binary, env, "get_server_list")
        if not servers.strip():
            raise RuntimeError("the daemon started but no MPS server serves its clients")
        status.update(running=True, server_pids=servers.split(), pipe_directory=str(folder),
                      probe=probe.stdout.strip())
        os.environ.update({k: env[k] for k in ENV})
        log(f"mps: running (server pid {' '.join(status['server_pids'])}, pipes in {folder})")
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        status["error"] = str(e)
        log(f"mps: not used ({e}); runs share the GPU time-sliced")
        if started:
            _quit(binary, env)
        started = False
    try:
        yield status
    finally:
        if started:
            status["quit"] = _quit(binary, env) or "ok"
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            log_file = folder / "log" / "control.log"
            if log_file.is_file():
                status["control_log_tail"] = log_file.read_text(errors="replace")[-1500:]
