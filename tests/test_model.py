"""Properties of the model: the seed's API, equivalences between variants, causality, cache vs
full forward, parameter counts, static queries."""

import dataclasses

import pytest
import torch

from conftest import LAYER_CASES, build, case_id, prefill_then_decode, small_config
from sqt import (BaselineLM, HybridLM, LMConfig, SQTLM, TransformerLM, VARIANTS, param_count,
                 preset)
from sqt.config import PRESETS

BLOCKS = ["classic", "modern"]


def test_seed_snippet_runs(capsys):
    cfg = LMConfig(vocab_size=65, d_model=256, n_heads=4, n_layers=4, d_ff=512, max_seq_len=256)
    x = torch.randint(0, 65, (1, 64))
    for m in (BaselineLM(cfg), SQTLM(cfg), HybridLM(cfg, n_sqt_layers=2)):
        print(m(x).shape)
    assert capsys.readouterr().out == "torch.Size([1, 64, 65])\n" * 3


def test_named_constructors_choose_layers():
    cfg = small_config(n_layers=4)
    assert [s.query for s in BaselineLM(cfg).specs] == ["proj"] * 4
    assert [s.query for s in SQTLM(cfg).specs] == ["table"] * 4
    assert [s.query for s in HybridLM(cfg, n_sqt_layers=3).specs] == ["table"] * 3 + ["proj"]
    mixed = TransformerLM(cfg, ["sqt", "sqt", "xsqa", "xsqa"])
    assert [(s.query, s.n_q_heads, s.n_kv_heads) for s in mixed.specs] == [
        ("table", 8, 8), ("table", 8, 8), ("proj", 2, 2), ("proj", 2, 2)]


def test_weight_names_are_the_public_surface():
    m = build(layers=("mha", "sqt"))
    names = dict(m.named_parameters())
    # Projected queries share one matmul with keys and values; a static table replaces them.
    assert names["blocks.0.attn.qkv_proj.weight"].shape == (3 * 32, 32)
    assert names["blocks.1.attn.qkv_proj.weight"].shape == (2 * 32, 32)
    assert names["blocks.1.attn.q_table"].shape == (24, 8, 4)
    for i in range(2):
        assert isinstance(m.blocks[i].attn.o_proj, torch.nn.Linear)


def unfused_state(model):
    """The state dict in the layout of separate q/k/v (and SwiGLU gate/up) projections, which
    `load_state_dict` still accepts: the tests below edit heads in it."""
    state = model.state_dict()
    for i, block in enumerate(model.blocks):
        pre = f"blocks.{i}.attn."
        for kind in ("weight", "bias"):
            fused = state.pop(pre + "qkv_proj." + kind, None)
            if fused is None:
                continue
            for name, part in zip("qkv", fused.split(block.attn.qkv_split, dim=0)):
                if part.shape[0]:
                    state[f"{pre}{name}_proj.{kind}"] = part
        if block.mlp.swiglu:
            pre = f"blocks.{i}.mlp."
            state[pre + "gate.weight"], state[pre + "up.weight"] = \
                state[pre + "up.weight"].chunk(2, dim=0)
    return state


@pytest.mark.parametrize("block", BLOCKS)
def test_unfused_checkpoints_load_as_the_same_model(block):
    m = build(block, ("mha", "sqt"))
    state = unfused_state(m)
    assert "blocks.0.attn.q_proj.weight" in state and "blocks.1.attn.q_proj.weight" not in state
    fresh = build(block, ("mha", "sqt"), seed=3)
    fresh.load_state_dict(state)
    x = torch.randint(0, 37, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["sqa", "xsqa", "rsqa", "lsqa"])
def test_output_projection_width_follows_attention_heads(name):
    spec = build(layers=name).specs[0]
    o = build(layers=name).blocks[0].attn.o_proj
    assert o.in_features == max(spec.n_q_heads, spec.n_kv_heads) * 4


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("layers", LAYER_CASES, ids=case_id)
def test_causality(block, layers):
    """Changing tokens after position t changes no logit at or before t."""
    m = build(block, layers)
    x = torch.randint(0, 37, (2, 20))
    t = 11
    y = x.clone()
    y[:, t + 1:] = torch.randint(0, 37, (2, 20 - t - 1))
    assert not torch.equal(x, y)
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("layers", LAYER_CASES, ids=case_id)
def test_cached_decoding_matches_full_forward(block, layers):
    """Prefill a prompt, then decode one token at a time: logits equal the full forward."""
    m = build(block, layers)
    x = torch.randint(0, 37, (3, 19))
    full, cached, cache = prefill_then_decode(m, x)
    assert cache.pos.device == x.device and cache.pos.dim() == 0 and int(cache.pos) == 19
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("layers", LAYER_CASES, ids=case_id)
def test_decoding_chunks_over_a_dirty_cache_match_full_forward(block, layers):
    """Decode steps of several tokens (T > 1) reproduce the full forward, over a cache whose
    unwritten positions hold random numbers and whose view covers all of it: positions not
    written yet are never read. The same cache, reset, serves a second sequence."""
    m = build(block, layers)
    cache = m.new_cache(2, 20)
    for buf in cache.k + cache.v:
        buf.normal_()
    for seed in range(2):
        x = torch.randint(0, 37, (2, 20), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            full = m(x)
            cache.reset()
            parts = [m(x[:, :5], cache)]
            for a, b in ((5, 8), (8, 9), (9, 15), (15, 20)):
                parts.append(m(x[:, a:b], cache, decode=True))
        assert int(cache.pos) == 20
        torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_weights():
    """GQA *is* MHA whose K/V projections repeat each K/V head across its query group."""
    for block in BLOCKS:
        gqa = build(block, "gqa")
        mha = build(block, "mha", seed=1)
        state = unfused_state(gqa)
        group, hd = 4, 4
        for key, value in list(state.items()):
            if ".k_proj." in key or ".v_proj." in key:
                heads = value.reshape(-1, hd, *value.shape[1:])
                state[key] = heads.repeat_interleave(group, dim=0).reshape(-1, *value.shape[1:])
        mha.load_state_dict(state)
        x = torch.randint(0, 37, (2, 16))
        with torch.no_grad():
            torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def test_ssqa_equals_mha_with_half_the_heads_switched_off():
    """sSQA with H/2 heads equals an H-head MHA whose other H/2 heads write nothing (their o_proj
    columns are zero), given the same weights for the heads that remain."""
    for block in BLOCKS:
        ssqa = build(block, "ssqa")
        mha = build(block, "mha", seed=1)
        state = unfused_state(mha)
        width = 4 * 4  # H/2 heads of head_dim 4
        for key, value in unfused_state(ssqa).items():
            if any(p in key for p in (".q_proj.", ".k_proj.", ".v_proj.")):
                state[key][:width] = value
            elif key.endswith("o_proj.weight"):
                state[key].zero_()
                state[key][:, :width] = value
            else:
                state[key] = value
        mha.load_state_dict(state)
        x = torch.randint(0, 37, (2, 16))
        with torch.no_grad():
            torch.testing.assert_close(ssqa(x), mha(x), rtol=1e-5, atol=1e-5)


def test_ssqa_layer_matches_torch_multihead_attention():
    """An independent implementation: torch's own MultiheadAttention with H/2 heads, fed the
    layer's projected q, k, v, gives the same attention output."""
    m = build("classic", "ssqa")
    attn = m.blocks[0].attn
    x = torch.randn(2, 10, 32)
    ref = torch.nn.MultiheadAttention(16, 4, bias=False, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.eye(16).repeat(3, 1))
        ref.out_proj.weight.copy_(torch.eye(16))
        mask = torch.ones(10, 10, dtype=torch.bool).triu(1)
        q, k, v = attn.qkv_proj(x).split(attn.qkv_split, dim=-1)
        expected = attn.o_proj(ref(q, k, v, attn_mask=mask, need_weights=False)[0])
        torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("query", ["table", "rotary"])
def test_static_query_does_not_depend_on_input(query):
    m = build("classic", f"{query}:mha")
    attn = m.blocks[0].attn
    a, b = torch.randn(2, 12, 32), torch.randn(2, 12, 32)
    torch.testing.assert_close(attn.queries(a), attn.queries(b), rtol=0, atol=0)
    assert torch.equal(attn.queries(a)[0], attn.queries(a)[1])
    # ... while a projected query does depend on it.
    proj = build("classic", "mha").blocks[0].attn
    assert not torch.allclose(proj.queries(a), proj.queries(b))


def test_static_table_indexes_absolute_position():
    attn = build("classic", "sqt").blocks[0].attn
    q = attn.queries(torch.randn(1, 3, 32), positions=torch.tensor([5, 6, 7]))
    torch.testing.assert_close(q[0].transpose(0, 1), attn.q_table[5:8])
    torch.testing.assert_close(attn.queries(torch.randn(1, 3, 32))[0].transpose(0, 1),
                               attn.q_table[:3])


def test_static_rotary_query_has_no_length_limit():
    m = build("modern", "srq")
    assert m.max_positions is None
    with torch.no_grad():
        assert m(torch.randint(0, 37, (1, 60))).shape == (1, 60, 37)   # max_seq_len is 24


def test_window_at_least_sequence_length_is_full_attention():
    full = build("modern", "sqa")
    windowed = TransformerLM(dataclasses.replace(full.config, layers="sqa@64")).eval()
    windowed.load_state_dict(full.state_dict())
    x = torch.randint(0, 37, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(windowed(x), full(x), rtol=1e-5, atol=1e-5)


def test_window_limits_what_a_query_sees():
    """With window w, the logit at t depends on tokens t-w+1..t through one layer only."""
    m = build("modern", "mha@3", n_layers=1)
    x = torch.randint(0, 37, (1, 20))
    y = x.clone()
    y[:, 5] = (x[:, 5] + 1) % 37
    with torch.no_grad():
        a, b = m(x), m(y)
    changed = (a - b).abs().amax(-1)[0] > 1e-6
    assert changed.nonzero().flatten().tolist() == [5, 6, 7]


@pytest.mark.parametrize("name", ["tiny", "small", "medium"])
def test_presets_match_the_seed_sizes(name):
    target = {"tiny": 305e3, "small": 2.2e6, "medium": 7.0e6}[name]
    cfg = preset(name)
    assert abs(param_count(cfg) - target) / target < 0.05
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.n_heads % 4) == (65, 256, 0)
    for variant in VARIANTS:  # every named variant exists at every size
        cfg.with_layers(variant).layer_specs()


def test_sqa_dense_preset_is_the_papers_model():
    cfg = preset("sqa-dense")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size,
            cfg.max_seq_len, cfg.block) == (8, 256, 16, 16, 768, 10_000, 1024, "modern")
    assert set(PRESETS) >= {"tiny", "small", "medium", "sqa-dense"}


def test_dropout_is_active_in_training_only():
    m = build("classic", "mha", dropout=0.5)
    x = torch.randint(0, 37, (2, 10))
    m.train()
    assert not torch.equal(m(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))


def test_tied_embeddings_share_one_tensor():
    m = build("modern", "mha", tie_embeddings=True)
    assert m.lm_head.weight is m.tok_emb.weight


@pytest.mark.parametrize("block,layers", [("classic", "mha"), ("modern", "xsqa"),
                                          ("modern", "sqt")])
def test_block_checkpointing_computes_the_same_loss_and_gradients(block, layers):
    # Recomputing each block in the backward must replay it exactly, dropout masks included.
    plain = build(block, layers, dropout=0.3).train()
    ckpt = build(block, layers, dropout=0.3, checkpoint_blocks=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randint(0, 37, (2, 12))
    grads = []
    for m in (plain, ckpt):
        torch.manual_seed(7)
        loss = m(x).logsumexp(-1).mean()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("block", ["classic", "modern"])
def test_a_forward_never_parses_layer_names_again(block, monkeypatch):
    """What a forward reads of the config was resolved when the model was built: parsing layer
    names does arithmetic on fractions, which torch 2.11's compiler cannot trace (a graph break
    in every compiled step)."""
    model = TransformerLM(small_config(block=block, layers="sqa", n_heads=4))
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    want = model(idx)

    def parse_again(self):
        raise AssertionError("a forward parsed the layer names")
    monkeypatch.setattr(LMConfig, "layer_specs", parse_again)
    torch.testing.assert_close(model(idx), want)
