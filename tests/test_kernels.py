"""The attention backends agree with each other; K/V sharing needs no copies to be right."""

import pytest
import torch

from conftest import LAYER_CASES, build, case_id
import dataclasses

from sqt import TransformerLM
from sqt.kernels import (attend, attend_cached, cached_bias, eager_attention, flex_attention,
                         sdpa_attention)


def _qkv(nq, nkv, T=13, S=None, D=8):
    S = S or T
    return (torch.randn(2, nq, T, D), torch.randn(2, nkv, S, D), torch.randn(2, nkv, S, D))


@pytest.mark.parametrize("nq,nkv", [(8, 2), (8, 1), (4, 4)])
def test_enable_gqa_equals_explicit_kv_repetition(nq, nkv):
    q, k, v = _qkv(nq, nkv)
    g = nq // nkv
    shared = sdpa_attention(q, k, v)
    repeated = sdpa_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nq,nkv", [(8, 2), (2, 8), (4, 4)])
def test_backends_agree_on_the_op(nq, nkv):
    q, k, v = _qkv(nq, nkv, T=7)
    ref = attend(q, k, v, backend="eager")
    torch.testing.assert_close(attend(q, k, v, backend="sdpa"), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(attend(q, k, v, backend="flex"), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [1, 3, 50])
def test_flex_window_equals_eager_window(window):
    q, k, v = _qkv(4, 2, T=12)
    with torch.no_grad():
        torch.testing.assert_close(flex_attention(q, k, v, window),
                                   eager_attention(q, k, v, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("start,T", [(9, 1), (4, 5), (0, 3)])
@pytest.mark.parametrize("nq,nkv", [(8, 2), (2, 8), (4, 4)])
def test_cached_op_equals_the_rows_of_causal_attention(nq, nkv, start, T, window, backend):
    """Queries at positions start..start+T-1 over a cache view with the mask of `cached_bias`
    give those rows of full causal attention; the view's keys past the queries hold random
    numbers, which the mask keeps out."""
    q, k, v = _qkv(nq, nkv, T=start + T)
    ref_backend = "eager" if window else "sdpa"
    full = attend(q, k, v, backend=ref_backend, window=window)
    view = 16
    pad = lambda t: torch.cat([t, torch.randn(2, nkv, view - t.shape[2], 8)], dim=2)  # noqa
    bias = cached_bias(torch.arange(start, start + T), view, window)
    out = attend_cached(q[:, :, start:], pad(k), pad(v), bias, backend=backend)
    torch.testing.assert_close(out, full[:, :, start:], rtol=1e-5, atol=1e-5)


def test_attend_is_causal_from_position_zero_only():
    q, k, v = _qkv(4, 4, T=3, S=5)
    with pytest.raises(ValueError, match="3 queries over 5 keys"):
        attend(q, k, v, backend="sdpa")


def test_reverse_sqa_broadcasts_queries_over_kv_heads():
    """With 2 query heads and 8 K/V heads, output head j uses query head j // 4."""
    q, k, v = _qkv(2, 8)
    out = attend(q, k, v, backend="sdpa")
    assert out.shape == (2, 8, 13, 8)
    for j in range(8):
        one = eager_attention(q[:, j // 4:j // 4 + 1], k[:, j:j + 1], v[:, j:j + 1])
        torch.testing.assert_close(out[:, j:j + 1], one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", ["classic", "modern"])
@pytest.mark.parametrize("layers", LAYER_CASES, ids=case_id)
def test_model_backends_agree_with_eager_reference(block, layers):
    m = build(block, layers)
    x = torch.randint(0, 37, (2, 17))
    with torch.no_grad():
        out = m(x)
        for backend in ("eager", "flex"):
            other = TransformerLM(dataclasses.replace(m.config, backend=backend)).eval()
            other.load_state_dict(m.state_dict())
            torch.testing.assert_close(other(x), out, rtol=1e-5, atol=1e-5)


def test_which_backend_ran_can_be_asked():
    m = build("modern", ("mha", "sqa@4"))
    assert m.backends() == ["sdpa", "eager"]        # on the CPU FlexAttention cannot train
    eager = TransformerLM(dataclasses.replace(m.config, backend="eager"))
    assert eager.backends() == ["eager", "eager"]
