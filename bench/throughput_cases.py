"""What one throughput case runs, and what ran: a model step (forward, or a full training step) or
the bare attention op (forward, or forward and backward); the FLOPs it is credited with (from
sqt.accounting only); running it (warm-up, timing, profile, layer memory); and which attention
kernel the profiler saw, so every row of a table is known to be on the same kind of kernel."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from bench.common import attention_kernel_names, time_fn
from bench.layer_memory import layer_memory
from sqt import flash, kernels
from sqt.config import LMConfig, preset
from sqt.accounting import attention_flops, attention_train_flops, forward_flops, \
    train_step_flops
from sqt.model import TransformerLM
from sqt.variants import LayerSpec, parse_layer

# Model-level entries run the whole LM; op-level ("attn*") entries run only sqt.kernels.attend on
# random q, k, v of the variant's head counts. `paper` is the SQA paper's dense model.
MODELS: dict[str, dict] = {
    "paper": dict(kind="model", preset="sqa-dense"),                       # 16 heads x 16
    "wide64": dict(kind="model", preset="sqa-dense", d_model=1024, d_ff=2816),   # 16 x 64
    "wide128": dict(kind="model", preset="sqa-dense", d_model=2048, d_ff=5632),  # 16 x 128
    "attn16": dict(kind="op", n_heads=16, head_dim=16),
    "attn64": dict(kind="op", n_heads=16, head_dim=64),
    "attn128": dict(kind="op", n_heads=16, head_dim=128),
}

# Backend families. Model level: `sdpa` (config backend "sdpa"; full causal layers only, since SDPA
# has no sliding-window kernel), `flex` (every layer through FlexAttention) and `flash` (every
# layer through FlashAttention-4). Op level adds SDPA with one kernel forced: what each reaches.
MODEL_FAMILIES = ("sdpa", "flex", "flash")
OP_FAMILIES = ("sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex", "flash")
WINDOW_FAMILIES = ("flex", "flash")        # the families with a sliding-window kernel
SDPA_FORCE = ("flash", "cudnn", "efficient", "none")
# Training steps: plain, and with every block recomputed in the backward (LMConfig's
# checkpoint_blocks), which trades one more forward for memory; each also `-compiled`: forward and
# loss through torch.compile, as `sqt train` runs them on CUDA (the backward by AOTAutograd), so
# the elementwise work around attention is fused as in real training. At the op level `train` is
# the op's forward and backward.
TRAIN_MODES = ("train", "train-ckpt", "train-compiled", "train-ckpt-compiled")


def checkpointed(mode: str) -> bool:
    return mode.startswith("train-ckpt")


def compiled(mode: str) -> bool:
    return mode.endswith("-compiled")


def model_config(model: str, seq: int, family: str) -> LMConfig:
    m = MODELS[model]
    overrides = {k: v for k, v in m.items() if k not in ("kind", "preset")}
    # RoPE has no length limit; max_seq_len only documents the longest length used.
    return preset(m["preset"], max_seq_len=max(seq, 1024), backend=family, dropout=0.0,
                  **overrides)


def n_heads_of(model: str) -> int:
    m = MODELS[model]
    return m["n_heads"] if m["kind"] == "op" else preset(m["preset"]).n_heads


def head_dim_of(model: str) -> int:
    m = MODELS[model]
    if m["kind"] == "op":
        return m["head_dim"]
    return m.get("d_model", preset(m["preset"]).d_model) // n_heads_of(model)


def sdpa_context(force: str, device: torch.device):
    """Restrict SDPA to one kernel. Forcing is what makes 'same kernel for every variant' true by
    construction rather than by luck of torch's per-shape choice; the profiler then confirms it."""
    if force == "none":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[force]
    return sdpa_kernel([backend])


def prebuild_flex_mask(seq: int, window: Optional[int], device: torch.device) -> None:
    """Fill sqt.kernels' block-mask cache before the case starts, so mask building is neither in
    the timing nor in the case's peak memory (the core caches masks; building is set-up)."""
    if device.type == "cuda":
        kernels.flex_block_mask(seq, window, device)


@dataclass
class Case:
    """One timed thing: `fn()` runs one step; the rest describes it for the record. A training
    step also tells its first step's loss and gradient norm (`first_step`), and a model case
    measures its layer's memory beside the unfused layout (`layer_memory`)."""
    fn: Callable[[], object]
    spec: LayerSpec
    head_dim: int
    attn_flops: float            # forward attention FLOPs of the whole step (all layers)
    step_flops: float            # FLOPs credited to one call of fn (model or op)
    info: dict
    first_step: Optional[Callable[[], dict]] = None
    layer_memory: Optional[Callable[[], dict]] = None


def cell_seed(c: dict, seed: int) -> int:
    """The seed of a case's weights and data: one per (model, variant, length, batch), so that
    every family and mode of a cell starts from the same weights and batch (their losses can be
    compared)."""
    return seed + zlib.crc32(f"{c['model']}/{c['variant']}/{c['seq']}/{c['batch']}".encode())


def build_case(part_model: str, mode: str, family: str, variant: str, seq: int, batch: int,
               device: torch.device, sdpa_force: str, seed: int) -> Case:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if MODELS[part_model]["kind"] == "op":
        return _op_case(part_model, mode, family, variant, seq, batch, device, gen)
    return _model_case(part_model, mode, family, variant, seq, batch, device, sdpa_force, gen)


def _model_case(model_name, mode, family, variant, seq, batch, device, sdpa_force, gen) -> Case:
    cfg = dataclasses.replace(model_config(model_name, seq, family).with_layers(variant),
                              checkpoint_blocks=checkpointed(mode))
    spec = cfg.layer_specs()[0]
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    with torch.device(device):          # initialised where it runs: seconds saved at d 2048
        model = TransformerLM(cfg)
    # Random tokens (never zeros): an all-zero input is a degenerate case some kernels shortcut.
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(device)
    # A context manager can be entered once: make a fresh one for every call.
    ctx = (lambda: sdpa_context(sdpa_force, device)) if family == "sdpa" else contextlib.nullcontext
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    if family == "flex":
        for s in set(cfg.layer_specs()):
            prebuild_flex_mask(seq, s.window, device)
    first: dict = {}
    if mode == "forward":
        model.eval()

        def fn():
            with torch.inference_mode(), autocast, ctx():
                return model(idx)
        flops = forward_flops(cfg, batch, seq)
    else:
        model.train()
        targets = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def loss_of(idx, targets):
            with autocast:
                logits = model(idx)
                return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
        if compiled(mode):
            torch._dynamo.reset()     # each case compiles its own model, none reuses another's
        step_loss = torch.compile(loss_of) if compiled(mode) else loss_of

        def fn():
            with ctx():     # outside the compiled function: its kernel is chosen while tracing
                loss = step_loss(idx, targets)
                loss.backward()
            if not first:       # the step every family of this cell takes from the same weights
                first["loss"] = loss.detach().float()
                first["grad_norm"] = torch.linalg.vector_norm(torch.stack(
                    [p.grad.float().norm() for p in model.parameters() if p.grad is not None]))
            opt.step()
            opt.zero_grad(set_to_none=True)
        flops = train_step_flops(cfg, batch, seq)   # the recompute is overhead, not credited
    attn = sum(attention_flops(s, cfg.head_dim, batch, seq) for s in cfg.layer_specs())
    info = {"layer_backends": sorted(set(model.backends(seq_len=seq))),
            "params": model.num_params(), "sdpa_force": sdpa_force if family == "sdpa" else None,
            "fused_adamw": mode in TRAIN_MODES and device.type == "cuda",
            "checkpoint_blocks": cfg.checkpoint_blocks, "compiled": compiled(mode),
            **_flash_entry(family, device)}

    def memory():
        return layer_memory(cfg, batch, seq, device, train=mode in TRAIN_MODES, context=ctx)
    return Case(fn, spec, cfg.head_dim, attn, flops, info,
                first_step=lambda: {k: v.item() for k, v in first.items()},
                layer_memory=memory if device.type == "cuda" else None)


def _flash_entry(family: str, device: torch.device) -> dict:
    """For the flash family, which FlashAttention-4 functions run (the custom ops, or the public
    function where the private pair is missing), or why none can."""
    if family != "flash":
        return {}
    reason = flash.unavailable_reason(device)
    return {"flash_entry": flash.kernels().source if reason is None else f"none: {reason}"}


def _op_case(model_name, mode, family, variant, seq, batch, device, gen) -> Case:
    """sqt.kernels.attend alone on random bf16 q, k, v laid out as the model lays them out:
    (B, H, T, D) views of one (B, T, W) projection output. `train`: forward and backward, the
    gradients freed between calls."""
    m = MODELS[model_name]
    spec = parse_layer(variant, m["n_heads"])
    hd, train = m["head_dim"], mode in TRAIN_MODES
    widths = [spec.n_q_heads * hd, spec.n_kv_heads * hd, spec.n_kv_heads * hd]
    fused = torch.randn(batch, seq, sum(widths), generator=gen).to(device, torch.bfloat16)
    # Detached views are leaves of their own that keep the fused layout's strides.
    q, k, v = (t.unflatten(-1, (-1, hd)).transpose(1, 2).detach().requires_grad_(train)
               for t in fused.split(widths, dim=-1))
    backend = family if family in ("flex", "flash") else "sdpa"
    force = family.split("-", 1)[1] if family.startswith("sdpa-") else "none"
    ctx = lambda: sdpa_context(force, device)  # noqa: E731  (fresh per call)
    if backend == "flex":
        prebuild_flex_mask(seq, spec.window, device)
    if train:
        grad_out = torch.randn(batch, spec.n_attn_heads, seq, hd, generator=gen).to(
            device, torch.bfloat16)

        def fn():
            for t in (q, k, v):
                t.grad = None
            with ctx():
                out = kernels.attend(q, k, v, backend=backend, window=spec.window)
            out.backward(grad_out)
        flops = attention_train_flops(spec, hd, batch, seq)
    else:
        def fn():
            with torch.inference_mode(), ctx():
                return kernels.attend(q, k, v, backend=backend, window=spec.window)
        flops = attention_flops(spec, hd, batch, seq)
    return Case(fn, spec, hd, attention_flops(spec, hd, batch, seq), flops,
                {"sdpa_force": force if backend == "sdpa" else None, "layout": "fused",
                 **_flash_entry(family, device)})


def run_case(c: dict, a, device, profile: bool) -> dict:
    """Build, warm up, time and (optionally) profile one case; then, for a model case on CUDA,
    measure its layer's memory beside the unfused layout. Never raises for an OOM or a kernel
    that refuses the shape: the outcome is the record."""
    oom_error = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    case, memory, spec_info = None, None, None
    try:
        case = build_case(c["model"], c["mode"], c["family"], c["variant"], c["seq"],
                          c["batch"], device, a.sdpa_force, cell_seed(c, a.seed))
        wanted = a.layer_memory_seqs is None or c["seq"] in a.layer_memory_seqs
        memory = case.layer_memory if wanted else None
        if device.type == "cuda":
            # Peak from here: weights, inputs and optimizer state count; mask set-up does not.
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        case.fn()                                 # first call: compiles flex and FA4, allocates
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first = time.perf_counter() - t0
        # The first call is a warm-up already; short steps get more (clocks, allocator), and a
        # flex, flash or compiled step one more after its compile. Long steps are dominated by the
        # kernel.
        warm = 3 if first < 0.25 else (
            1 if c["family"] in WINDOW_FAMILIES or compiled(c["mode"]) or first < 1.0 else 0)
        t = time_fn(case.fn, device, warmup=warm, repeats=a.repeats, max_seconds=a.max_seconds)
        out = {"status": "ok", "timing": t, "seconds": t["median_ms"] / 1e3,
               "first_call_s": first, "warmup_calls": 1 + warm}
        if case.first_step:
            out.update({f"first_step_{k}": v for k, v in case.first_step().items()})
        if device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if profile:
            out.update(profile_kernels(case.fn, device))
    except oom_error as e:
        out = {"status": "oom", "reason": str(e).splitlines()[0][:300]}
    except (RuntimeError, ValueError, NotImplementedError, AssertionError) as e:
        # e.g. a forced SDPA kernel that does not support the shape: recorded, run goes on.
        out = {"status": "error", "reason": _first_line(e)}
    finally:
        if case is not None:
            spec_info = dict(spec=case.spec.name, n_q_heads=case.spec.n_q_heads,
                             n_kv_heads=case.spec.n_kv_heads, window=case.spec.window,
                             head_dim=case.head_dim, attn_flops=case.attn_flops,
                             step_flops=case.step_flops, **case.info)
        del case
        _release(device)
    if spec_info:
        out.update(spec_info)
    if memory is not None and out["status"] == "ok":
        out["layer_mem_mib"] = _measured(memory, device)
    return out


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {(msg or [''])[0][:300]}"


def _measured(memory: Callable[[], dict], device) -> dict:
    oom_error = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    try:
        return memory()
    except oom_error as e:
        return {"status": "oom", "reason": str(e).splitlines()[0][:300]}
    except (RuntimeError, ValueError, NotImplementedError, AssertionError) as e:
        return {"status": "error", "reason": _first_line(e)}
    finally:
        _release(device)


def _release(device) -> None:
    # Free the case's model, optimizer state and cached blocks before the next case, so its peak
    # memory (and an OOM's leftovers) cannot leak into the next one. Nothing to return on a CPU.
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# --- which kernel ran -------------------------------------------------------------------------

def kernel_kind(name: str) -> Optional[str]:
    """The attention implementation one kernel (or CPU op) name belongs to, or None. cuDNN's own
    kernels also say 'flash' (it implements FlashAttention-2), so cuDNN is tested first, then
    FlashAttention-4's, named after their module: `kernel_cutlass_kernel_flash_attncute...`."""
    n = name.lower()
    if n.startswith(("triton_poi", "triton_red", "triton_per")):
        # inductor's fused pointwise/reduction kernels, named after every op fused in: one that
        # reads an attention op's output (RoPE into the next layer) carries its name too
        return None
    if "cudnn" in n:
        return "sdpa-cudnn"
    if "flash_attncute" in n:         # CuTe DSL kernels of flash_attn.cute: FlashAttention-4
        return "flash"
    if "flex" in n or "triton_tem" in n:
        return "flex"
    if "flash" in n:
        return "sdpa-flash"
    if "fmha" in n or "efficient_attention" in n or "memeff" in n:
        return "sdpa-efficient"
    return None


def kernel_family(names: Iterable[str]) -> str:
    """One family for a step from every kernel it launched: the fused attention kernels if any;
    otherwise 'sdpa-math' when softmax kernels ran (SDPA's unfused fallback, or the eager path);
    several fused families at once read 'mixed:a+b'."""
    names = list(names)
    kinds = sorted({k for k in map(kernel_kind, names) if k})
    if len(kinds) == 1:
        return kinds[0]
    if kinds:
        return "mixed:" + "+".join(kinds)
    if any("softmax" in n.lower() for n in names):
        return "sdpa-math"
    return "unknown"


def profile_kernels(fn: Callable[[], object], device: torch.device) -> dict:
    """Run fn once under the profiler and keep the attention-looking names: CUDA kernel names on
    a GPU, aten op names on the CPU (there are no kernels to see there)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    want_cuda = device.type == "cuda"
    names = attention_kernel_names(e.key for e in events
                                   if str(e.device_type).endswith("CUDA") == want_cuda)
    out = {"kernels": [n[:200] for n in names[:12]], "kernel_family": kernel_family(names),
           "kernel_source": "cuda-kernels" if want_cuda else "cpu-ops"}
    if want_cuda:
        out.update(kernel_time_split((e.key, e.self_device_time_total) for e in events
                                     if str(e.device_type).endswith("CUDA")))
    return out


def kernel_time_split(kernels: Iterable[tuple[str, float]]) -> dict:
    """From (kernel name, device microseconds) of one profiled step: the time of every kernel
    and of the attention kernels (their forward, backward and helpers; kernel_kind). What share
    of a step attention takes bounds what a faster attention kernel can do for the step."""
    total = attention = 0.0
    for name, us in kernels:
        total += us
        if kernel_kind(name):
            attention += us
    return {"kernel_ms": total / 1e3, "attention_kernel_ms": attention / 1e3}
