"""The mixture-of-experts feed-forward: the grouped path is the reference loop (forward and
backward), no token is dropped, the auxiliary losses have their defined values, the parameter and
FLOP formulas match the built model and the model card, and an MoE model is still a causal LM
whose cached decoding equals its full forward."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import prefill_then_decode, small_config
from sqt import LMConfig, TransformerLM, active_param_count, param_count, preset
from sqt.accounting import feed_forward_params, linear_flops_per_token
from sqt.moe import MoE, cuda_graph_blocker, load_balancing_loss, router_z_loss

CARD = {"gqa": 8.67e6, "mqa": 8.64e6, "sqa": 8.57e6, "ssqa": 8.62e6, "xsqa": 8.52e6}


def moe_config(**kw) -> LMConfig:
    return small_config("modern", **{"n_experts": 6, "top_k": 2, **kw})


def moe_layer(seed=0, **kw) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(moe_config(**kw))
    # A sharper router than the init's, so that routing is uneven and some experts get no token.
    torch.nn.init.normal_(layer.router.weight, std=0.5)
    return layer


def run_both(layer, x):
    """Outputs and gradients (input, router, expert weights) of the grouped path and the loop."""
    results = []
    for impl in ("grouped", "loop"):
        layer.impl = impl
        layer.zero_grad()
        xi = x.detach().clone().requires_grad_()
        y = layer(xi)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = [xi.grad] + [p.grad.clone() for p in
                             (layer.router.weight, layer.w_up, layer.w_down)]
        results.append((y.detach(), grads, layer.load.clone()))
    return results


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_grouped_equals_loop_forward_and_backward_fp32(top_k):
    layer = moe_layer(top_k=top_k)
    x = torch.randn(5, 7, 32)
    (y_g, grads_g, load_g), (y_l, grads_l, load_l) = run_both(layer, x)
    torch.testing.assert_close(y_g, y_l, rtol=1e-5, atol=1e-6)
    for g, l in zip(grads_g, grads_l):
        torch.testing.assert_close(g, l, rtol=1e-5, atol=1e-6)
    assert torch.equal(load_g, load_l) and load_g.sum() == 35 * top_k


def test_grouped_equals_loop_with_an_expert_that_gets_no_token():
    layer = moe_layer()
    with torch.no_grad():
        layer.router.weight[3] = -1.0      # with inputs >= 0, never in the top 2
    x = torch.randn(40, 32).abs()
    (y_g, grads_g, load), (y_l, grads_l, _) = run_both(layer, x)
    assert load[3] == 0
    torch.testing.assert_close(y_g, y_l, rtol=1e-5, atol=1e-6)
    for g, l in zip(grads_g, grads_l):
        torch.testing.assert_close(g, l, rtol=1e-5, atol=1e-6)
    assert grads_g[2][3].abs().max() == 0 and grads_g[3][3].abs().max() == 0


def test_grouped_equals_loop_in_bf16():
    layer = moe_layer().to(torch.bfloat16)
    x = torch.randn(6, 9, 32, dtype=torch.bfloat16)
    (y_g, grads_g, _), (y_l, grads_l, _) = run_both(layer, x)
    assert y_g.dtype == torch.bfloat16
    torch.testing.assert_close(y_g, y_l, rtol=2e-2, atol=2e-3)
    for g, l in zip(grads_g, grads_l):
        torch.testing.assert_close(g, l, rtol=2e-2, atol=2e-2 * l.abs().max().item())


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_every_token_gets_exactly_its_top_k_experts(impl):
    layer = moe_layer(moe_impl=impl, top_k=3).eval()
    x = torch.randn(30, 32)
    with torch.no_grad():
        weights, experts, probs, _ = layer.route(x)
        y = layer(x)
        for t in range(30):
            want = torch.zeros(32)
            for w, e in zip(weights[t], experts[t]):
                gate, up = (x[t] @ layer.w_up[e]).chunk(2)
                want += w * ((F.silu(gate) * up) @ layer.w_down[e])
            torch.testing.assert_close(y[t], want, rtol=1e-5, atol=1e-6)
    # Renormalised top-k weights of the k largest probabilities.
    torch.testing.assert_close(weights.sum(-1), torch.ones(30))
    assert torch.equal(experts.sort(-1).values, probs.topk(3, -1).indices.sort(-1).values)


def test_top1_keeps_the_raw_probability_so_the_router_learns():
    layer = moe_layer(top_k=1)
    x = torch.randn(20, 32)
    weights, experts, probs, _ = layer.route(x)
    torch.testing.assert_close(weights[:, 0], probs.max(-1).values)
    layer(x).sum().backward()                             # the task loss alone, no aux
    assert layer.router.weight.grad.abs().max() > 0


def test_load_balancing_loss_is_one_when_uniform_and_grows_with_imbalance():
    E = 4
    uniform = load_balancing_loss(torch.full((E,), 10), torch.full((8, E), 1 / E))
    assert uniform.item() == pytest.approx(1.0)
    values = []
    for skew in (0.0, 0.3, 0.6, 0.9):
        p = torch.full((E,), (1 - skew) / E)
        p[0] += skew                                      # expert 0 takes a growing share
        values.append(load_balancing_loss(torch.round(p * 1000).long(), p.expand(8, E)).item())
    assert values[0] == pytest.approx(1.0, abs=1e-3)
    assert all(a < b for a, b in zip(values, values[1:]))
    one_expert = load_balancing_loss(torch.tensor([5, 0, 0, 0]), torch.eye(E)[[0] * 5])
    assert one_expert.item() == pytest.approx(E)


def test_aux_loss_values_of_a_uniform_router():
    # A zero router gives every expert probability 1/E: the balance loss is exactly 1 whatever
    # the tie-break, and logsumexp of zero logits is log E.
    layer = moe_layer(moe_aux_coef=0.5, moe_z_coef=0.25)
    torch.nn.init.zeros_(layer.router.weight)
    layer(torch.randn(12, 32))
    assert layer.aux_loss.item() == pytest.approx(0.5 * 1.0 + 0.25 * math.log(6) ** 2)
    logits = torch.randn(10, 6)
    assert router_z_loss(logits).item() == pytest.approx(
        (logits.exp().sum(-1).log() ** 2).mean().item(), rel=1e-6)


def test_model_returns_the_sum_of_its_layers_aux_losses():
    torch.manual_seed(0)
    m = TransformerLM(moe_config(n_layers=3, moe_z_coef=1e-3))
    inputs = {}
    for i, block in enumerate(m.blocks):
        block.mlp.register_forward_pre_hook(lambda mod, args, i=i: inputs.update({i: args[0]}))
    x = torch.randint(0, 37, (2, 16))
    logits, aux = m(x, return_aux=True)
    want = 0.0
    for i, block in enumerate(m.blocks):
        _, _, probs, router_logits = block.mlp.route(inputs[i].flatten(0, 1))
        want += (0.01 * load_balancing_loss(block.mlp.load, probs)
                 + 1e-3 * router_z_loss(router_logits)).item()
    assert aux.item() == pytest.approx(want, rel=1e-6)
    assert torch.equal(logits, m(x))
    assert [load.sum().item() for load in m.expert_load()] == [2 * 16 * 2] * 3


@pytest.mark.parametrize("layers", list(CARD) + ["mha"])
def test_param_formulas_match_the_built_sqat_micro(layers):
    cfg = preset("sqat-micro", layers=layers)
    m = TransformerLM(cfg)
    assert m.num_params() == param_count(cfg)
    moe = m.blocks[0].mlp
    per_expert = moe.w_up[0].numel() + moe.w_down[0].numel()
    idle = cfg.n_layers * (cfg.n_experts - cfg.top_k) * per_expert
    assert active_param_count(cfg) == m.num_params() - idle
    if layers in CARD:  # the card's figures, to the percent (the preset's comment says why)
        assert abs(param_count(cfg) / CARD[layers] - 1) < 0.01


def test_flops_count_the_router_and_the_active_experts():
    cfg = preset("sqat-micro", layers="gqa")
    dense = dataclasses.replace(cfg, n_experts=0, d_ff=cfg.top_k * cfg.expert_width)
    router = 2 * cfg.d_model * cfg.n_experts * cfg.n_layers
    assert linear_flops_per_token(cfg) == linear_flops_per_token(dense) + router
    assert feed_forward_params(cfg, active=True) == feed_forward_params(dense) + 128 * 12


def test_a_dense_model_ignores_the_moe_fields():
    base = small_config("modern", n_layers=3)
    other = dataclasses.replace(base, top_k=1, expert_d_ff=64, moe_aux_coef=0.3, moe_z_coef=1.0,
                                moe_impl="loop")
    x = torch.randint(0, 37, (2, 12))
    outs = []
    for cfg in (base, other):
        torch.manual_seed(7)
        m = TransformerLM(cfg).eval()
        assert not any(k.endswith(("router.weight", "w_up", "w_down")) for k in m.state_dict())
        assert m.num_params() == param_count(cfg) == active_param_count(cfg)
        with torch.no_grad():
            logits, aux = m(x, return_aux=True)
        assert aux.item() == 0 and torch.equal(logits, m(x)) and m.expert_load() == []
        outs.append((logits, m.state_dict()))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(outs[0][1][k], outs[1][1][k]) for k in outs[0][1])


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_moe_model_is_causal(impl):
    torch.manual_seed(0)
    m = TransformerLM(moe_config(moe_impl=impl, layers="gqa")).eval()
    x = torch.randint(0, 37, (1, 20))
    y = x.clone()
    y[:, 9] = (x[:, 9] + 1) % 37
    with torch.no_grad():
        a, b = m(x), m(y)
    assert torch.equal(a[:, :9], b[:, :9]) and not torch.equal(a[:, 9], b[:, 9])


@pytest.mark.parametrize("layers", ["gqa", "xsqa"])
def test_cached_decoding_matches_full_forward_with_moe(layers):
    torch.manual_seed(0)
    m = TransformerLM(moe_config(layers=layers)).eval()
    full, cached, _ = prefill_then_decode(m, torch.randint(0, 37, (3, 19)))
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)


def test_block_checkpointing_keeps_the_aux_loss_and_its_gradients():
    x = torch.randint(0, 37, (2, 16))
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        m = TransformerLM(moe_config(checkpoint_blocks=recompute, moe_z_coef=0.1)).train()
        logits, aux = m(x, return_aux=True)
        (logits.square().mean() + aux).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)


def test_a_tiny_moe_model_learns():
    torch.manual_seed(0)
    m = TransformerLM(moe_config(vocab_size=16, n_layers=2, moe_z_coef=1e-3)).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    data = torch.arange(16).repeat(2, 3)[:, :24]        # a sequence that predicts itself
    losses = []
    for _ in range(15):
        logits, aux = m(data[:, :-1], return_aux=True)
        loss = F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("kw, message", [
    (dict(n_experts=4, top_k=5), "top_k=5 exceeds n_experts=4"),
    (dict(n_experts=4, block="classic"), "block='classic'"),
    (dict(n_experts=-1), "n_experts=-1"),
    (dict(n_experts=4, top_k=0), "top_k=0"),
    (dict(n_experts=4, expert_d_ff=0), "expert_d_ff=0"),
    (dict(n_experts=4, moe_aux_coef=-0.1), "moe_aux_coef=-0.1"),
    (dict(n_experts=4, moe_z_coef=float("nan")), "moe_z_coef=nan"),
    (dict(n_experts=4, moe_impl="fast"), "moe_impl='fast'"),
    (dict(n_experts=4, expert_d_ff=20), "expert_d_ff=20 with moe_impl='grouped'"),
])
def test_bad_moe_settings_are_clear_errors(kw, message):
    base = dict(vocab_size=37, d_model=32, n_heads=4, n_layers=2, d_ff=48, block="modern")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        LMConfig(**{**base, **kw})


def test_loop_impl_takes_any_width_and_blocks_cuda_graphs_only_on_cuda():
    cfg = moe_config(expert_d_ff=20, moe_impl="loop")
    assert TransformerLM(cfg).num_params() == param_count(cfg)
    assert cuda_graph_blocker(cfg, "cpu") is None
    assert cuda_graph_blocker(moe_config(n_experts=0), "cpu") is None


def test_trainer_records_aux_loss_and_expert_load():
    from sqt.data import load_tinyshakespeare
    from sqt.train import TrainConfig, train
    model = LMConfig(vocab_size=65, d_model=32, n_heads=2, n_layers=2, d_ff=32, max_seq_len=32,
                     block="modern", n_experts=4, top_k=2)
    run = TrainConfig(steps=20, batch_size=4, seq_len=32, lr=3e-3, warmup=2, eval_every=10,
                      eval_batches=2, device="cpu", progress=False)
    r = train(model, run, load_tinyshakespeare())
    first, last = r["curves"][0], r["curves"][-1]
    assert last["val_loss"] < first["val_loss"]
    for c in r["curves"]:
        assert 0 < c["aux_loss"] <= 0.01 * 4               # coefficient x balance (at most E)
        assert len(c["expert_load"]) == 2 and all(len(layer) == 4 for layer in c["expert_load"])
        assert all(sum(layer) == pytest.approx(1.0) for layer in c["expert_load"])
