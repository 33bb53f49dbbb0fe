"""Decode steps positioned without a prefill, for timing: move the engine to a context length,
fill its cache with random keys and values, run greedy steps, and list the kernels of a step. Used
by the decode benchmark and the sweep's latency timing."""

from __future__ import annotations

import torch

from sqt.engine import DecodeEngine

from .common import attention_kernel_names


def seek(engine: DecodeEngine, length: int) -> None:
    """Position the engine at `length` without a prefill, so its next step writes position
    `length`: long contexts are timed without paying for their prefill. Earlier positions keep
    whatever they hold (see `randomize_cache`). The cache's position is on the device and the
    engine's count of it on the host; both move together."""
    if isinstance(length, bool) or not isinstance(length, int) \
            or not 1 <= length < engine.max_len:
        raise ValueError(f"seek({length!r}): expected an integer in 1..{engine.max_len - 1}")
    engine.cache.pos.fill_(length)
    engine.length = length


@torch.no_grad()
def randomize_cache(engine: DecodeEngine) -> None:
    """Fill every cached key and value with random numbers, once, before timing steps after
    `seek`: a zero-filled cache can run faster than real data and hides a step that reads
    nothing."""
    for buf in engine.cache.k + engine.cache.v:
        buf.normal_()


def greedy_steps(engine: DecodeEngine, start: int, n: int):
    """A closure that repositions the cache at `start` and decodes `n` greedy tokens, from a
    cache of random keys and values and random first tokens (never zeros)."""
    randomize_cache(engine)
    first = torch.randint(engine.model.config.vocab_size, (engine.batch_size,),
                          device=engine.device)

    def run():
        seek(engine, start)
        nxt = first
        for _ in range(n):
            nxt = engine.step(nxt).argmax(-1)
        return nxt
    return run


def kernel_profile(engine: DecodeEngine, start: int, steps: int = 3) -> dict:
    """The kernels of one decode step, run eagerly (the same kernels the graph replays): how
    many, and which attention kernel ran."""
    from torch.profiler import ProfilerActivity, profile
    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    use_graphs, engine.use_graphs = engine.use_graphs, False
    try:
        seek(engine, start)
        tok = torch.randint(engine.model.config.vocab_size, (engine.batch_size,),
                            device=engine.device)
        engine.step(tok)   # lazy initialisation outside the profile
        seek(engine, start)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                engine.step(tok)
            if cuda:
                torch.cuda.synchronize()
    finally:
        engine.use_graphs = use_graphs
    want = "CUDA" if cuda else "CPU"
    names = [e.name for e in prof.events() if e.device_type.name == want
             and (cuda or e.name.startswith("aten::"))]
    distinct = sorted(set(names))
    return {"kind": "cuda kernels" if cuda else "cpu ops (all levels)",
            "per_step": len(names) / steps,
            "attention": attention_kernel_names(distinct),
            "distinct": distinct[:80]}
