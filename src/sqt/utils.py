"""Small shared helpers: atomic file writes, the one device resolver, the run record (versions,
device, code revision) that every result carries so a number can be traced to what produced it,
and the published peak rates that MFU is taken against when none was measured."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import secrets
import subprocess
from pathlib import Path

import numpy as np
import torch


def atomic_write_bytes(path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a reader sees the old
    file or the new one, never half of one, even if the process is killed mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are private (0600); this one gets the umask's permissions.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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


DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def check_device_name(value, *, name: str = "device") -> None:
    """A ValueError unless `value` is spelled as a device this project runs on."""
    if not isinstance(value, str) or not _DEVICE_RE.match(value):
        raise ValueError(f"{name}={value!r}: expected {DEVICE_FORMS}")


def resolve_device(value: str, *, name: str = "device") -> torch.device:
    """`auto` (CUDA when available, else the CPU), `cpu`, `cuda` or `cuda:N`, checked against this
    machine. `name` is how the caller's user knows the setting (`--device` on the command line)."""
    check_device_name(value, name=name)
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(value)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={value!r}: CUDA is not available on this machine; "
                             "expected auto or cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name}={value!r}: this machine has {count} CUDA device(s); "
                             f"expected cuda:0 .. cuda:{count - 1}")
    return device


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is a device or host allocation that failed: torch's OutOfMemoryError (CUDA)
    or the CPU allocator's RuntimeError."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(error, (oom, MemoryError)) or (isinstance(error, RuntimeError) and any(
        s in str(error) for s in ("out of memory", "can't allocate memory")))


TOKEN_ID_DTYPES = (torch.int64, torch.int32)


def check_token_id_tensor(idx, *, name: str = "idx") -> None:
    """A ValueError unless `idx` is a tensor of integer token ids (what an embedding takes):
    checks its type and dtype only, on the host, so it costs nothing on any device."""
    if not isinstance(idx, torch.Tensor):
        raise ValueError(f"{name} is a {type(idx).__name__}: expected a torch tensor of token ids")
    if idx.dtype not in TOKEN_ID_DTYPES:
        raise ValueError(f"{name} has dtype {idx.dtype}: expected integer token ids "
                         "(torch.long or torch.int32)")


def check_token_ids(idx, vocab_size: int, *, name: str = "idx") -> None:
    """`check_token_id_tensor`, and every id in [0, vocab_size). Reading the range back is a host
    synchronisation on CUDA: call this where ids enter (a prompt, a dataset), never inside a
    captured or compiled step."""
    check_token_id_tensor(idx, name=name)
    if idx.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(idx))
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        where = tuple(int(i) for i in (idx == bad).nonzero()[0])
        raise ValueError(f"{name} holds token id {bad} at {list(where)}: expected ids in "
                         f"[0, {vocab_size}) (vocab_size={vocab_size})")


def check_split_ids(split, vocab_size: int, *, name: str, chunk: int = 1 << 24) -> None:
    """Every id of a token split (a numpy array or memmap, or a tensor) in [0, vocab_size),
    read a chunk at a time so that a memmap is streamed, never held in memory whole."""
    if isinstance(split, torch.Tensor):
        return check_token_ids(split.reshape(1, -1), vocab_size, name=name)
    for start in range(0, len(split), chunk):
        part = np.asarray(split[start:start + chunk])
        if part.size and (int(part.min()) < 0 or int(part.max()) >= vocab_size):
            bad = np.flatnonzero((part < 0) | (part >= vocab_size))[0]
            raise ValueError(f"{name} holds token id {int(part[bad])} at position "
                             f"{start + int(bad)}: expected ids in [0, {vocab_size}) "
                             f"(vocab_size={vocab_size})")


# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, matched against
# torch.cuda.get_device_name. A device not listed gets no peak, hence no MFU: never a guess.
KNOWN_BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756.5),                   # H100 PCIe
    (r"H100 80GB HBM3|H100 SXM", 989.5),      # H100 SXM5
    (r"GH200|H200$", 989.5),                  # H200 SXM, GH200: the H100 SXM's tensor cores
    (r"A100", 312.0),                         # every A100 form factor
)


def known_peak_tflops(device_name: str, dtype: torch.dtype) -> float | None:
    """The published dense peak for `device_name` computing in `dtype`, or None when unknown."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    return next((peak for pattern, peak in KNOWN_BF16_PEAK_TFLOPS
                 if re.search(pattern, device_name)), None)


def peak_for(device: torch.device, dtype: torch.dtype, *,
             measured: float | None = None) -> tuple[float | None, str | None]:
    """The peak TFLOP/s that MFU is taken against, and where it comes from: the caller's
    measurement, else the published peak of a known CUDA device (KNOWN_BF16_PEAK_TFLOPS),
    else none."""
    if measured is not None:
        return measured, "measured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = known_peak_tflops(name, dtype)
        if peak is not None:
            return peak, f"published dense {str(dtype).replace('torch.', '')} peak of {name}"
    return None, None


def run_record(device: torch.device | str | None = None) -> dict:
    """Where and with what a result was produced."""
    device = torch.device(device) if device is not None else resolve_device("auto")
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
