"""What one throughput case runs, and what ran: a model step (forward, or a full training step) or
the bare attention op; the FLOPs it is credited with (from sqt.accounting only); and which attention
kernel the profiler saw, so every row of a table is known to be on the same kind of kernel."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from bench.common import attention_kernel_names
from sqt import kernels
from sqt.config import LayerSpec, LMConfig, parse_layer, preset
from sqt.accounting import attention_flops, forward_flops, train_step_flops
from sqt.model import TransformerLM

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
# has no sliding-window kernel) and `flex` (every layer through FlexAttention). Op level adds SDPA
# with one kernel forced, to show what each kernel reaches.
MODEL_FAMILIES = ("sdpa", "flex")
OP_FAMILIES = ("sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex")
SDPA_FORCE = ("flash", "cudnn", "efficient", "none")
# Training steps: plain, and with every block recomputed in the backward (LMConfig's
# checkpoint_blocks), which trades one more forward for memory.
TRAIN_MODES = ("train", "train-ckpt")


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
    """One timed thing: `fn()` runs one step; the rest describes it for the record."""
    fn: Callable[[], object]
    spec: LayerSpec
    head_dim: int
    attn_flops: float            # forward attention FLOPs of the whole step (all layers)
    step_flops: float            # FLOPs credited to one call of fn (model or op)
    info: dict


def build_case(part_model: str, mode: str, family: str, variant: str, seq: int, batch: int,
               device: torch.device, sdpa_force: str, seed: int) -> Case:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if MODELS[part_model]["kind"] == "op":
        return _op_case(part_model, family, variant, seq, batch, device, gen)
    return _model_case(part_model, mode, family, variant, seq, batch, device, sdpa_force, gen)


def _model_case(model_name, mode, family, variant, seq, batch, device, sdpa_force, gen) -> Case:
    cfg = dataclasses.replace(model_config(model_name, seq, family).with_layers(variant),
                              checkpoint_blocks=mode == "train-ckpt")
    spec = cfg.layer_specs()[0]
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = TransformerLM(cfg).to(device)
    # Random tokens (never zeros): an all-zero input is a degenerate case some kernels shortcut.
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(device)
    # A context manager can be entered once: make a fresh one for every call.
    ctx = (lambda: sdpa_context(sdpa_force, device)) if family == "sdpa" else contextlib.nullcontext
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    if family == "flex":
        for s in set(cfg.layer_specs()):
            prebuild_flex_mask(seq, s.window, device)
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

        def fn():
            with autocast, ctx():
                logits = model(idx)
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        flops = train_step_flops(cfg, batch, seq)   # the recompute is overhead, not credited
    attn = sum(attention_flops(s, cfg.head_dim, batch, seq) for s in cfg.layer_specs())
    info = {"layer_backends": sorted(set(model.backends())), "params": model.num_params(),
            "sdpa_force": sdpa_force if family == "sdpa" else None,
            "fused_adamw": mode in TRAIN_MODES and device.type == "cuda",
            "checkpoint_blocks": cfg.checkpoint_blocks}
    return Case(fn, spec, cfg.head_dim, attn, flops, info)


def _op_case(model_name, family, variant, seq, batch, device, gen) -> Case:
    m = MODELS[model_name]
    spec = parse_layer(variant, m["n_heads"])
    hd = m["head_dim"]

    def rand(heads):
        return torch.randn(batch, heads, seq, hd, generator=gen).to(device, torch.bfloat16)
    q, k, v = rand(spec.n_q_heads), rand(spec.n_kv_heads), rand(spec.n_kv_heads)
    backend = "flex" if family == "flex" else "sdpa"
    force = family.split("-", 1)[1] if family.startswith("sdpa-") else "none"
    ctx = lambda: sdpa_context(force, device)  # noqa: E731  (fresh per call)
    if backend == "flex":
        prebuild_flex_mask(seq, spec.window, device)

    def fn():
        with torch.inference_mode(), ctx():
            return kernels.attend(q, k, v, backend=backend, window=spec.window)
    flops = attention_flops(spec, hd, batch, seq)
    return Case(fn, spec, hd, flops, flops, {"sdpa_force": force if backend == "sdpa" else None})


# --- which kernel ran -------------------------------------------------------------------------

def kernel_kind(name: str) -> Optional[str]:
    """The attention implementation one kernel (or CPU op) name belongs to, or None. cuDNN's own
    kernels also say 'flash' (it implements FlashAttention-2), so cuDNN is tested first."""
    n = name.lower()
    if "cudnn" in n:
        return "sdpa-cudnn"
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
    return {"kernels": [n[:200] for n in names[:12]], "kernel_family": kernel_family(names),
            "kernel_source": "cuda-kernels" if want_cuda else "cpu-ops"}
