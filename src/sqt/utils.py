"""Small shared helpers: atomic file writes and the run record (versions, device, code revision)
that every result carries so a number can be traced to what produced it."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch


def atomic_write_bytes(path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a reader sees the old
    file or the new one, never half of one, even if the process is killed mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def git_revision() -> str | None:
    """The code's revision, `-dirty` when it has uncommitted changes. SQT_GIT_REVISION, when set,
    wins: a tree copied to another machine may carry no .git, or a stale one."""
    if os.environ.get("SQT_GIT_REVISION"):
        return os.environ["SQT_GIT_REVISION"]
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                             capture_output=True, text=True, timeout=5).stdout.strip()
        if rev:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=here, capture_output=True, text=True, timeout=5).stdout
            return rev + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def run_record(device: torch.device | str | None = None) -> dict:
    """Where and with what a result was produced."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    rec = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": git_revision(),
        "device_type": device.type,
    }
    if device.type == "cuda":
        rec["device"] = torch.cuda.get_device_name(device)
        rec["cuda"] = torch.version.cuda
    else:
        rec["device"] = f"CPU ({platform.processor() or platform.machine()}, " \
                        f"{torch.get_num_threads()} threads)"
    return rec


def allow_many_recompiles(limit: int = 1024) -> None:
    """Compiled code with static shapes recompiles for every new shape. Past dynamo's default
    recompile limit (8) a compiled function silently runs uncompiled (FlexAttention then runs its
    unfused reference, a compiled decode step its eager kernels), which a benchmark over many
    shapes reaches quickly and would time as if it were compiled. Raise the limits instead."""
    import torch._dynamo.config as dc
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), limit))
