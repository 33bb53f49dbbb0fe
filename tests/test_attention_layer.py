"""`sqt.attention_layer`, the drop-in module: it is the layer TransformerLM uses, it builds for
every variant string the library accepts, and it decodes with a KVCache of its own."""

import pytest
import torch

from conftest import LAYER_CASES, build, case_id
from sqt import HEAD_LAYOUTS, VARIANTS, Attention, KVCache, attention_layer
from sqt.variants import QUERY_SOURCES

BLOCK_OPTIONS = {"classic": dict(rope=False, bias=True), "modern": dict(rope=True, bias=False)}


@pytest.mark.parametrize("block", list(BLOCK_OPTIONS))
@pytest.mark.parametrize("layers", LAYER_CASES, ids=case_id)
def test_equals_the_layer_inside_a_model(block, layers):
    m = build(block, layers)
    x = torch.randn(2, 13, 32)
    for inner, spec in zip((b.attn for b in m.blocks), m.specs):
        layer = attention_layer(d_model=32, n_heads=8, variant=spec.name, max_seq_len=24,
                                **BLOCK_OPTIONS[block])
        assert type(layer) is Attention and layer.spec == spec
        layer.load_state_dict(inner.state_dict())     # strict: the same parameter names
        with torch.no_grad():
            torch.testing.assert_close(layer(x), inner(x), rtol=0, atol=0)


ACCEPTED = (list(VARIANTS) + [f"{q}:{name}" for q in QUERY_SOURCES for name in HEAD_LAYOUTS]
            + ["8/2", "2/8", "table:4/4", "rotary:8/1", "sqa@5", "table:xsqa@3", "3/1@2"])


@pytest.mark.parametrize("variant", ACCEPTED)
def test_every_accepted_variant_builds_and_runs(variant):
    layer = attention_layer(d_model=64, n_heads=8, variant=variant, max_seq_len=32)
    x = torch.randn(2, 10, 64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("variant", ["gqa", "rsqa", "table:sqa", "rotary:mqa", "mha@3"])
def test_standalone_layer_decodes_with_its_own_cache(variant):
    """Prefill then one token at a time equals the layer on the whole sequence; the caller moves
    the cache's position, as TransformerLM does."""
    layer = attention_layer(d_model=32, n_heads=8, variant=variant, max_seq_len=16)
    x = torch.randn(2, 12, 32)
    cache = KVCache(layer, 2, 12)
    with torch.no_grad():
        parts = [layer(x[:, :4], cache)]
        cache.pos.fill_(4)
        for t in range(4, 12):
            parts.append(layer(x[:, t:t + 1], cache, decode=True))
            cache.pos += 1
        torch.testing.assert_close(torch.cat(parts, dim=1), layer(x), rtol=1e-5, atol=1e-5)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match=r"d_model=30 is not divisible by n_heads=8"):
        attention_layer(d_model=30, n_heads=8)
    with pytest.raises(ValueError, match=r"variant 'sqaa'"):
        attention_layer(d_model=32, n_heads=8, variant="sqaa")
    with pytest.raises(ValueError, match=r"rope='yes': expected True or False"):
        attention_layer(d_model=32, n_heads=8, rope="yes")
    with pytest.raises(ValueError, match=r"variant=3"):
        attention_layer(d_model=32, n_heads=8, variant=3)
    with pytest.raises(ValueError, match=r"KVCache max_len=20 exceeds max_seq_len=16"):
        KVCache(attention_layer(d_model=32, n_heads=8, variant="sqt", max_seq_len=16), 1, 20)
