"""The attention backends agree with each other; K/V sharing needs no copies to be right."""

import pytest
import torch

from conftest import LAYER_CASES, build, case_id
from sqt.kernels import attend, eager_attention, sdpa_attention, flex_attention
import dataclasses
from sqt import TransformerLM


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


@pytest.mark.parametrize("offset", [0, 5])
@pytest.mark.parametrize("nq,nkv", [(8, 2), (2, 8), (4, 4)])
def test_backends_agree_on_the_op(nq, nkv, offset):
    q, k, v = _qkv(nq, nkv, T=7, S=7 + offset)
    ref = attend(q, k, v, "eager", offset)
    torch.testing.assert_close(attend(q, k, v, "sdpa", offset), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(attend(q, k, v, "flex", offset), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [1, 3, 50])
def test_flex_window_equals_eager_window(window):
    q, k, v = _qkv(4, 2, T=9, S=12)
    with torch.no_grad():
        torch.testing.assert_close(flex_attention(q, k, v, 3, window),
                                   eager_attention(q, k, v, 3, window), rtol=1e-5, atol=1e-5)


def test_reverse_sqa_broadcasts_queries_over_kv_heads():
    """With 2 query heads and 8 K/V heads, output head j uses query head j // 4."""
    q, k, v = _qkv(2, 8)
    out = attend(q, k, v, "sdpa")
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
