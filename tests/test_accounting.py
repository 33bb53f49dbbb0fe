"""The accounting formulas against the built model: parameters counted from its tensors, FLOPs
counted by torch's FLOP counter and from its matmul weights, bytes from its cache and weights."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import LAYER_CASES, build, case_id
from sqt.accounting import (attention_flops, forward_flops, kv_bytes_per_token,
                            linear_flops_per_token, param_count, sum_visible_keys,
                            weight_bytes_per_decode_step)
from sqt.attention import KVCache
from sqt.kernels import allowed_mask

BLOCKS = ["classic", "modern"]


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("layers", LAYER_CASES, ids=case_id)
@pytest.mark.parametrize("tie", [False, True])
def test_param_count_matches_formula(block, layers, tie):
    m = build(block, layers, tie_embeddings=tie)
    assert m.num_params() == param_count(m.config)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("layers", LAYER_CASES, ids=case_id)
@pytest.mark.parametrize("tie", [False, True])
def test_linear_flops_are_twice_the_matmul_weights(block, layers, tie):
    m = build(block, layers, tie_embeddings=tie)
    weights = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    frozen = sum(b.numel() for n, b in m.named_buffers() if n.endswith("q_random"))
    assert linear_flops_per_token(m.config) == 2 * (weights + frozen)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("layers", ["mha", "gqa", "sqa", "rsqa", "sqt", ("sqt", "xsmqa"),
                                    ("idq", "random:sqa")], ids=case_id)
def test_forward_flops_match_torch_flop_counter(block, layers):
    """The eager backend computes every (query, key) pair, masked or not, so torch's counter
    sees the linear FLOPs plus the attention FLOPs without the causal discount."""
    m = build(block, layers, backend="eager")
    B, T = 2, 11
    with FlopCounterMode(display=False) as counter:
        m(torch.randint(0, 37, (B, T)))
    cfg = m.config
    dense = sum(attention_flops(s, cfg.head_dim, B, T, causal=False) for s in cfg.layer_specs())
    assert counter.get_total_flops() == linear_flops_per_token(cfg) * B * T + dense
    causal = sum(attention_flops(s, cfg.head_dim, B, T) for s in cfg.layer_specs())
    assert forward_flops(cfg, B, T) == linear_flops_per_token(cfg) * B * T + causal


@pytest.mark.parametrize("window", [None, 1, 3, 7, 40])
@pytest.mark.parametrize("q_len,offset", [(1, 0), (1, 20), (9, 0), (9, 4), (5, 30)])
def test_visible_keys_are_the_pairs_the_mask_allows(q_len, offset, window):
    q_pos = torch.arange(offset, offset + q_len)
    allowed = allowed_mask(q_pos, torch.arange(offset + q_len), window)
    assert sum_visible_keys(q_len, offset, window) == allowed.sum().item()


@pytest.mark.parametrize("layers", ["mha", "gqa", "mqa", "rsqa", ("sqt", "xsmqa")], ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_per_token_are_what_the_cache_holds_per_position(layers, dtype):
    cfg = build("modern", layers).config
    per = kv_bytes_per_token(cfg, bytes_per_element=torch.finfo(dtype).bits // 8)
    assert KVCache(cfg, 3, 20, dtype=dtype).bytes() == 3 * 20 * per


def _decode_read_bytes(model, batch: int) -> int:
    """A decode step reads every weight matrix once (frozen random query matrices too) and, of
    the lookup tables, one row per sequence: counted from the model's own tensors."""
    size = model.tok_emb.weight.element_size()
    lookups = {id(model.tok_emb.weight)} | {id(p) for n, p in model.named_parameters()
                                            if n.endswith(("pos_emb.weight", "q_table"))}
    total = 0
    for p in model.parameters():
        total += batch * p[0].numel() if id(p) in lookups else p.numel()
    total += sum(b.numel() for n, b in model.named_buffers() if n.endswith("q_random"))
    if model.config.tie_embeddings:      # the head reads the whole shared matrix as well
        total += model.lm_head.weight.numel()
    return total * size


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("layers", LAYER_CASES, ids=case_id)
def test_weight_bytes_per_decode_step_from_the_modules(block, layers):
    for tie in (False, True):
        m = build(block, layers, tie_embeddings=tie)
        formula = weight_bytes_per_decode_step(m.config, 5, bytes_per_element=4)
        assert formula == _decode_read_bytes(m, 5)
    untied = weight_bytes_per_decode_step(build(block, layers).config, 5, bytes_per_element=4)
    assert formula == untied   # tying shares storage, not reads: the head reads the whole matrix
