"""Conversions as equivalences: a conversion that changes nothing is the identity; mean-pooling
K/V heads that were already equal is exact (MHA -> GQA); a table made from queries that are a
function of position is exact, and one table layer is exactly what the probe's Δ loss measured;
keeping, first-, content- or pool-choosing query heads is exact wherever the dropped heads wrote
nothing or the merged heads were the same. Every output is a valid model of the target layout."""

import pytest
import torch

from conftest import build
from sqt.convert import convert, head_groups
from sqt.probe import mean_loss, query_probe
from sqt.variants import parse_layer

VOCAB = 37


def windows(n=16, t=16, seed=0):
    return torch.randint(0, VOCAB, (n, t + 1), generator=torch.Generator().manual_seed(seed))


def logits(model, seed=1):
    with torch.no_grad():
        return model(windows(2, 20, seed)[:, :-1])


def sharpened(block, layers, seed=0):
    """Weights far from init's near-uniform attention, so a misplaced head shows in the logits."""
    model = build(block, layers, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("qkv_proj.weight"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model


@pytest.mark.parametrize("method", ["first", "content", "pooled"])
@pytest.mark.parametrize("block,layers", [("classic", "mha"), ("modern", "gqa"),
                                          ("modern", ("srq", "sqa")), ("classic", "sqt")])
def test_converting_to_the_same_layout_is_the_identity(block, layers, method):
    model = sharpened(block, layers)
    same = model.config.layers
    new, record = convert(model, same, method=method, corpus=windows())
    assert new.config == model.config
    torch.testing.assert_close(logits(new), logits(model), rtol=0, atol=0)


def _equal_kv_within_groups(model, group):
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn
            q_w, kv_w, _ = attn.qkv_split
            for part in (attn.qkv_proj.weight, attn.qkv_proj.bias):
                if part is None:
                    continue
                for start in (q_w, q_w + kv_w):   # keys, then values
                    heads = part[start:start + kv_w].view(attn.spec.n_kv_heads, attn.head_dim, -1)
                    for g in range(0, attn.spec.n_kv_heads, group):
                        heads[g:g + group] = heads[g]


@pytest.mark.parametrize("block", ["classic", "modern"])
@pytest.mark.parametrize("target,group", [("gqa", 4), ("mqa", 8), ("2/2", 4)])
def test_mha_with_equal_kv_heads_in_each_group_converts_to_gqa_exactly(block, target, group):
    model = sharpened(block, "mha")
    _equal_kv_within_groups(model, group)
    if target == "2/2":   # fewer query heads too: keep heads 0 and 4, one per group
        with torch.no_grad():
            for b in model.blocks:
                o = b.attn.o_proj.weight.view(32, 8, 4)
                o[:, [h for h in range(8) if h % 4]] = 0
    new, _ = convert(model, target, method="content",
                     probe={"layers": [{"q_share": [0, 1, 1, 1, 0, 1, 1, 1]}] * 2})
    spec = parse_layer(target, 8)
    assert [(s.n_q_heads, s.n_kv_heads) for s in new.specs] == [(spec.n_q_heads,
                                                                  spec.n_kv_heads)] * 2
    torch.testing.assert_close(logits(new), logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers", [None, [1]])
def test_a_table_from_queries_that_are_a_function_of_position_is_exact(layers):
    model = sharpened("classic", "mha")
    with torch.no_grad():
        model.tok_emb.weight.zero_()
    new, record = convert(model, "sqt", layers=layers, corpus=windows(4, 24))
    assert [s.query for s in new.specs] == (["table", "table"] if layers is None
                                            else ["proj", "table"])
    torch.testing.assert_close(logits(new), logits(model), rtol=1e-5, atol=1e-5)
    assert record["corpus"] == {"windows": 4, "seq_len": 24}


@pytest.mark.parametrize("block,layers", [("classic", "mha"), ("modern", "idq"),
                                          ("modern", "rndq")])
def test_one_table_layer_is_what_the_probe_measured(block, layers):
    model, w = sharpened(block, layers), windows()
    probe = query_probe(model, w)
    for i in range(2):
        new, _ = convert(model, "table:mha", layers=[i], corpus=w)
        delta = mean_loss(new, w) - probe["base_loss"]
        assert delta == pytest.approx(probe["layers"][i]["delta_loss"], abs=1e-5)


def _switch_off(model, heads):
    with torch.no_grad():
        for b in model.blocks:
            b.attn.o_proj.weight.view(32, b.attn.spec.n_attn_heads, 4)[:, heads] = 0


@pytest.mark.parametrize("method,dead", [("first", [4, 5, 6, 7]), ("content", [0, 2, 4, 6])])
def test_dropping_heads_that_write_nothing_is_exact(method, dead):
    model = sharpened("modern", "mha")
    _switch_off(model, dead)
    probe = {"layers": [{"q_share": [0.9, 0.1, 0.9, 0.2, 0.8, 0.3, 0.9, 0.1]}] * 2}
    new, record = convert(model, "ssqa", method=method, probe=probe)
    assert record["heads"]["0"] == [[h] for h in range(8) if h not in dead]
    torch.testing.assert_close(logits(new), logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", ["classic", "modern"])
def test_pooling_heads_that_are_the_same_is_exact(block):
    model = sharpened(block, "mha")
    with torch.no_grad():   # heads 2k and 2k+1 compute the same attention
        for b in model.blocks:
            for part in (b.attn.qkv_proj.weight, b.attn.qkv_proj.bias):
                if part is not None:
                    heads = part.view(3, 8, 4, -1) if part.dim() == 2 else part.view(3, 8, 4)
                    heads[:, 1::2] = heads[:, 0::2]
    new, record = convert(model, "ssqa", method="pooled")
    assert record["heads"]["1"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    torch.testing.assert_close(logits(new), logits(model), rtol=1e-5, atol=1e-5)


def test_head_groups_follow_the_method():
    src, dst = parse_layer("mha", 8), parse_layer("xsqa", 8)
    assert head_groups(src, dst, "first") == [[0], [1]]
    assert head_groups(src, dst, "content", content_order=[5, 3, 1]) == [[3], [5]]
    assert head_groups(src, dst, "pooled") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert head_groups(src, src, "pooled") == [[h] for h in range(8)]


@pytest.mark.parametrize("model_layers,to,kw,match", [
    ("mha", "rsqa", {}, "reverse SQA"),
    ("xsqa", "mha", {}, "do not invent them"),
    ("srq", "sqt", {}, "from rotary in the modern block"),
    ("mha", "sqt", {}, "give corpus windows"),
    ("mha", "xsqa", {"method": "content"}, "give corpus windows or a probe"),
    ("mha", "6/2", {"method": "pooled"}, "6 must divide 8"),
    ("idq", "identity:xsqa", {"method": "pooled"}, "only its first heads"),
    ("mha", "gqa", {"layers": [2]}, "not a layer index in 0..1"),
    ("mha", ("gqa", "mqa", "sqa"), {}, "3 specs for 2 layers"),
    ("mha", "mha", {"method": "best"}, "method='best'"),
])
def test_impossible_conversions_are_refused_with_the_reason(model_layers, to, kw, match):
    with pytest.raises(ValueError, match=match):
        convert(build("classic", model_layers), to, **kw)


def test_controls_keep_their_first_heads_exactly():
    model = sharpened("modern", ("idq", "rndq"))
    _switch_off(model, [2, 3, 4, 5, 6, 7])
    new, _ = convert(model, ("identity:xsqa", "random:xsqa"))
    assert new.blocks[1].attn.q_random.shape == (8, 32)
    torch.testing.assert_close(logits(new), logits(model), rtol=1e-5, atol=1e-5)
    table, _ = convert(model, "table:xsqa", method="pooled", corpus=windows())
    assert [s.query for s in table.specs] == ["table", "table"]
