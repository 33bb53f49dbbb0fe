"""The decode engine against the references: the eager loop of sqt.generate and the full forward's
argmax. Run in float64 so that a greedy comparison is never decided by the last bit of a float
(the engine attends over a masked, longer cache view, a different reduction order)."""

import pytest
import torch

from conftest import LAYER_CASES, build, case_id
from sqt.accounting import kv_bytes_per_token
from sqt.attention import KVCache
from sqt.engine import DecodeEngine
from sqt.generate import generate

PROMPT, NEW = 5, 17   # 22 of the 24 positions: crosses buckets of 8 twice


@pytest.mark.parametrize("block", ["classic", "modern"])
@pytest.mark.parametrize("layers", LAYER_CASES, ids=case_id)
def test_greedy_matches_eager_loop_and_full_forward(block, layers):
    model = build(block, layers).double()
    idx = torch.randint(0, 37, (3, PROMPT))
    eager = generate(model, idx, NEW, temperature=0)
    engine = DecodeEngine(model, batch_size=3, max_len=PROMPT + NEW, bucket=8)
    out = engine.generate(idx, NEW, temperature=0)
    assert torch.equal(out, eager)
    full = model(eager[:, :-1]).argmax(-1)[:, PROMPT - 1:]
    assert torch.equal(full, eager[:, PROMPT:])


def test_windowed_decode_path_without_eager_fallback():
    # On the CPU, `auto` runs windowed layers eagerly; forcing flex sends the decode step through
    # the masked-SDPA decode op with a window, which is what CUDA runs. The reference is the
    # same weights on the eager backend.
    model = build("modern", ("sqa@3", "mha@4"), backend="flex").double()
    reference = build("modern", ("sqa@3", "mha@4"), backend="eager").double()
    idx = torch.randint(0, 37, (2, PROMPT))
    eager = generate(reference, idx, NEW, temperature=0)
    out = DecodeEngine(model, 2, PROMPT + NEW, bucket=8).generate(idx, NEW, temperature=0)
    assert torch.equal(out, eager)


def test_float32_engine_matches_eager_loop():
    model = build("classic", "gqa")
    idx = torch.randint(0, 37, (2, PROMPT))
    engine = DecodeEngine(model, 2, 24)
    assert torch.equal(engine.generate(idx, NEW, temperature=0),
                       generate(model, idx, NEW, temperature=0))


def test_engine_is_reusable_across_prompts():
    model = build("modern", "mqa").double()
    engine = DecodeEngine(model, 1, 24, bucket=4)
    for seed in range(3):
        idx = torch.randint(0, 37, (1, 2 + seed), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(engine.generate(idx, 10, temperature=0),
                           generate(model, idx, 10, temperature=0))


def test_stop_token_matches_eager_loop():
    model = build("classic", "sqa").double()
    idx = torch.randint(0, 37, (4, PROMPT))
    eager = generate(model, idx, NEW, temperature=0)
    # Stop on a token the first sequence produces early, so outputs are trimmed and padded.
    stop = int(eager[0, PROMPT + 2])
    ref = generate(model, idx, NEW, temperature=0, stop_token=stop)
    engine = DecodeEngine(model, 4, PROMPT + NEW)
    for check_every in (1, 4, 64):
        out = engine.generate(idx, NEW, temperature=0, stop_token=stop, check_every=check_every)
        assert torch.equal(out, ref), check_every
    assert (ref[0, PROMPT + 3:] == stop).all()


def test_sampling_reproducible_with_seed_and_matches_eager_loop():
    model = build("modern", "xsqa").double()
    idx = torch.randint(0, 37, (2, PROMPT))
    engine = DecodeEngine(model, 2, PROMPT + NEW)

    def run(fn, seed):
        return fn(idx, NEW, temperature=0.9, top_k=10, top_p=0.9,
                  generator=torch.Generator().manual_seed(seed))

    a, b = run(engine.generate, 7), run(engine.generate, 7)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(engine.generate, 8))
    # Same logits, same sampler, same generator: the eager loop draws the same tokens.
    assert torch.equal(a, run(lambda *x, **k: generate(model, *x, **k), 7))


def test_top_k_1_is_greedy():
    model = build("classic", "sqt").double()
    idx = torch.randint(0, 37, (2, PROMPT))
    engine = DecodeEngine(model, 2, PROMPT + NEW)
    assert torch.equal(engine.generate(idx, NEW, temperature=1.3, top_k=1),
                       engine.generate(idx, NEW, temperature=0))


def test_stream_and_callback_yield_each_step():
    model = build("classic", "mha")
    idx = torch.randint(0, 37, (1, 3))
    engine = DecodeEngine(model, 1, 12)
    streamed = [t for t in engine.stream(idx, 6, temperature=0)]
    seen = []
    out = engine.generate(idx, 6, temperature=0, callback=seen.append)
    assert len(streamed) == len(seen) == 6
    assert torch.equal(torch.stack(streamed, 1), out[:, 3:])


def test_engine_runs_on_the_one_cache_and_counts_with_it():
    """Prefill is reset + forward on the model's KVCache; every step advances the device
    position and the host's count together."""
    model = build("modern", ("sqa@3", "sqt"))
    engine = DecodeEngine(model, 3, 20, bucket=4)
    assert isinstance(engine.cache, KVCache)
    assert engine.cache.bytes() == 3 * 20 * kv_bytes_per_token(model.config, bytes_per_element=4)
    idx = torch.randint(0, 37, (3, PROMPT))
    engine.generate(idx, 9, temperature=0)
    assert engine.length == int(engine.cache.pos) == PROMPT + 8
    assert engine.cache.view_len == 16    # the bucket of the last step, which wrote position 12
    engine.prefill(idx[:, :2])
    assert engine.length == int(engine.cache.pos) == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_len=25), "max_seq_len=24"),
    (dict(max_len=0), "max_len=0"),
    (dict(bucket=0), "bucket=0"),
    (dict(use_graphs=True), "CUDA graphs need a CUDA"),
])
def test_construction_errors(kwargs, match):
    args = {"batch_size": 1, "max_len": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        DecodeEngine(build(), **args)


@pytest.mark.parametrize("prompt, new, match", [
    (torch.zeros(2, 3, dtype=torch.long), 2, "batch_size=1"),
    (torch.zeros(1, 0, dtype=torch.long), 2, "empty"),
    (torch.zeros(1, 8, dtype=torch.long), 3, "max_len=10"),
    (torch.zeros(1, 3, dtype=torch.long), 0, "max_new_tokens=0"),
])
def test_request_errors(prompt, new, match):
    engine = DecodeEngine(build(), 1, 10)
    with pytest.raises(ValueError, match=match):
        engine.generate(prompt, new, temperature=0)


def test_step_before_prefill_and_past_the_end():
    engine = DecodeEngine(build(), 1, 4)
    with pytest.raises(RuntimeError, match="before prefill"):
        engine.step(torch.zeros(1, dtype=torch.long))
    engine.prefill(torch.zeros(1, 3, dtype=torch.long))
    engine.step(torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="cache is full"):
        engine.step(torch.zeros(1, dtype=torch.long))
