"""Incremental generation: greedy decoding follows the full forward's argmax; sampling options
behave as their definitions say."""

import pytest
import torch

from conftest import LAYER_CASES, build, case_id
from sqt import generate, sample_next, stream


@pytest.mark.parametrize("layers", LAYER_CASES, ids=case_id)
def test_greedy_generation_is_the_argmax_of_the_full_forward(layers):
    m = build("modern", layers)
    prompt = torch.randint(0, 37, (2, 5))
    out = generate(m, prompt, 10, temperature=0)
    with torch.no_grad():
        ids = prompt
        for _ in range(10):
            ids = torch.cat([ids, m(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_stop_token_ends_each_sequence():
    m = build("classic", "sqt")
    prompt = torch.randint(0, 37, (3, 4))
    free = generate(m, prompt, 12, temperature=0)
    stop = int(free[0, 6])                     # a token the first sequence emits at step 3
    out = generate(m, prompt, 12, temperature=0, stop_token=stop)
    for row, ref in zip(out, free):
        gen, new = row[4:].tolist(), ref[4:].tolist()
        k = new.index(stop) if stop in new else len(new)
        # Identical to free generation up to and including the first stop token, then only stop
        # tokens; a sequence that never stops is identical throughout.
        assert gen[:k + 1] == new[:min(k + 1, len(gen))]
        assert all(t == stop for t in gen[k + 1:])
    assert stop in out[0, 4:].tolist()
    # Generation ends once every sequence has stopped, so never later than free generation.
    assert out.shape[1] <= free.shape[1]


def test_streaming_yields_each_step_and_callback_sees_the_same():
    m = build("modern", "xsqa")
    prompt = torch.randint(0, 37, (2, 3))
    streamed = list(stream(m, prompt, 6, temperature=0))
    seen = []
    out = generate(m, prompt, 6, temperature=0, callback=seen.append)
    assert len(streamed) == len(seen) == 6
    assert torch.equal(torch.stack(streamed, 1), out[:, 3:])
    assert torch.equal(torch.stack(seen, 1), out[:, 3:])


def test_sampling_is_reproducible_with_a_generator():
    m = build("modern", "gqa")
    prompt = torch.randint(0, 37, (2, 3))
    run = lambda: generate(m, prompt, 8, temperature=1.0, top_p=0.9,
                           generator=torch.Generator().manual_seed(7))
    assert torch.equal(run(), run())


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(64, 37)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6), greedy)
    # A top_p below the rounding of a softmax sum still keeps the best token (never all -inf).
    for tiny in (1e-12, 1e-300, 5e-324):
        assert torch.equal(sample_next(logits, temperature=1.0, top_p=tiny), greedy)


def test_top_k_samples_only_among_the_k_best():
    logits = torch.randn(1, 37).expand(2000, 37)
    picks = sample_next(logits, temperature=2.0, top_k=3,
                        generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) <= set(logits[0].topk(3).indices.tolist())


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    picks = sample_next(probs.log().expand(3000, 4), temperature=1.0, top_p=0.7,
                        generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {0, 1}


def test_generation_errors():
    m = build("classic", "sqt")
    with pytest.raises(ValueError, match=r"prompt is empty"):
        generate(m, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"prompt length 20 \+ max_new_tokens=10 exceeds the "
                                         r"model's max_seq_len=24"):
        generate(m, torch.randint(0, 37, (1, 20)), 10)
    with pytest.raises(ValueError, match=r"temperature=-1"):
        generate(m, torch.randint(0, 37, (1, 2)), 3, temperature=-1)
    with pytest.raises(ValueError, match=r"top_p=1.5"):
        generate(m, torch.randint(0, 37, (1, 2)), 3, top_p=1.5)
    with pytest.raises(ValueError, match=r"max_new_tokens=0"):
        generate(m, torch.randint(0, 37, (1, 2)), 0)
