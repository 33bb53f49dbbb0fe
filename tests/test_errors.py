"""Bad input gets a ValueError that names the field, the value and what is accepted."""

import pytest
import torch

from conftest import build, small_config
from sqt import LayerSpec, LMConfig, TransformerLM, parse_layer, preset


def raises(match):
    return pytest.raises(ValueError, match=match)


def test_d_model_not_divisible_by_heads():
    with raises(r"d_model=100 is not divisible by n_heads=8"):
        LMConfig(d_model=100, n_heads=8)


def test_head_counts_that_do_not_divide():
    with raises(r"n_q_heads=6, n_kv_heads=4: one head count must divide the other"):
        LayerSpec(6, 4)
    with raises(r"n_q_heads=6, n_kv_heads=4"):
        small_config(layers="6/4")


def test_unknown_variant():
    with raises(r"variant 'xsqaa'.*expected one of mha, gqa"):
        small_config(layers="xsqaa")
    with raises(r"query='static'"):
        LayerSpec(4, 4, query="static")


def test_named_variant_that_does_not_fit_the_head_count():
    with raises(r"variant 'xsqa' with n_heads=6: n_q_heads would be 1/4 x 6 = 1.5"):
        LMConfig(d_model=96, n_heads=6, layers="xsqa")
    with raises(r"n_heads=6"):
        parse_layer("gqa", 6)


def test_wrong_number_of_layer_specs():
    with raises(r"layers has 3 entries but n_layers=2"):
        small_config(layers=("mha", "sqt", "mha"))


@pytest.mark.parametrize("block,layers", [("classic", "mha"), ("modern", "sqt"),
                                          ("modern", ("mha", "table:xsqa"))])
def test_sequence_longer_than_the_table_or_positions(block, layers):
    m = build(block, layers)
    with raises(r"sequence length 25 exceeds max_seq_len=24"):
        m(torch.randint(0, 37, (1, 25)))
    # Decode steps cannot check positions on the host, so the cache is never larger.
    with raises(r"KVCache max_len=30 exceeds max_seq_len=24"):
        m.new_cache(1, 30)


def test_cache_misuse():
    m = build("modern", "mha")
    with raises(r"decode=True needs the KVCache"):
        m(torch.randint(0, 37, (1, 2)), decode=True)
    cache = m.new_cache(1, 8)
    with raises(r"sequence length 9 exceeds the KV cache's max_len=8"):
        m(torch.randint(0, 37, (1, 9)), cache)
    with raises(r"view_len=9: expected an integer in 1..8"):
        cache.view_len = 9
    with raises(r"KVCache batch_size=0"):
        m.new_cache(0, 8)


def test_window_on_a_backend_that_cannot_do_it():
    with raises(r"backend='sdpa' with window=128.*use backend 'flex', 'eager' or 'auto'"):
        TransformerLM(small_config(layers="mha@128", backend="sdpa"))
    with raises(r"backend='cudnn'"):
        small_config(backend="cudnn")


def test_flex_cannot_train_on_the_cpu():
    m = build("modern", "mha@4", backend="flex").train()
    with raises(r"FlexAttention has no CPU backward"):
        m(torch.randint(0, 37, (1, 8)))


def test_other_fields():
    with raises(r"n_layers=0: expected an integer >= 1"):
        LMConfig(n_layers=0)
    with raises(r"block='fancy'"):
        LMConfig(block="fancy")
    with raises(r"dropout=1.5"):
        LMConfig(dropout=1.5)
    with raises(r"window=0"):
        LayerSpec(4, 4, window=0)
    with raises(r"preset 'huge'"):
        preset("huge")
    with raises(r"n_sqt_layers=5: expected an integer in 0..2"):
        from sqt import HybridLM
        HybridLM(small_config(), n_sqt_layers=5)
    with raises(r"idx has shape \(5,\)"):
        build()(torch.randint(0, 37, (5,)))
    with raises(r"layer spec 'mha@'"):
        small_config(layers="mha@")
    with raises(r"cfg=dict"):
        TransformerLM({"d_model": 8})


def test_config_round_trips_through_a_dict():
    cfg = small_config(layers=("sqt", "sqa@8"))
    assert LMConfig.from_dict(cfg.to_dict()) == cfg
    with raises(r"unknown fields \['n_embd'\]"):
        LMConfig.from_dict({**cfg.to_dict(), "n_embd": 3})


def test_checkpoint_blocks_must_be_a_bool():
    with raises(r"checkpoint_blocks='yes': expected True or False"):
        LMConfig(checkpoint_blocks="yes")
