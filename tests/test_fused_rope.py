"""RoPE applied in place on the fused Q/K/V projection output: the layer computes the function of
the plain unfused layout (separate projections, RoPE into new tensors) with the same gradients,
compiled or not, and keeps no more for the backward pass than that layout does."""

import pytest
import torch

from bench.layer_memory import UnfusedAttention
from sqt import attention_layer
from sqt.attention import Rotary

VARIANTS = ["mha", "gqa", "xsqa", "rsqa", "sqa@5", "table:sqa", "rotary:mqa"]


def test_in_place_rotation_is_the_out_of_place_one_bit_for_bit():
    rope, B, T, H, D = Rotary(8), 2, 11, 5, 8
    fused = torch.randn(B, T, H * D + 24)
    at = torch.arange(3, 3 + T)
    want = rope(fused[..., :H * D].unflatten(-1, (H, D)).transpose(1, 2), at).transpose(1, 2)
    rest = fused[..., H * D:].clone()
    got = rope.rotate_heads_(fused, [(0, 2 * D), (2 * D, H * D)], at)
    assert got is fused
    assert torch.equal(got[..., :H * D].unflatten(-1, (H, D)), want)
    assert torch.equal(got[..., H * D:], rest)            # columns outside the spans untouched


def _loss_and_grads(module, x):
    """Output, and the gradients of a fixed linear function of it by parameter name ('x': the
    input's), parameters the module does not use left out."""
    y = module(x)
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
    names, params = zip(*module.named_parameters())
    grads = torch.autograd.grad(loss, (x,) + params, allow_unused=True)
    return y, {n.removeprefix("_orig_mod."): g for n, g in zip(("x",) + names, grads)
               if g is not None}


@pytest.mark.parametrize("block", ["classic", "modern"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_layer_is_the_unfused_layer_with_the_same_gradients(block, variant):
    torch.manual_seed(0)
    layer = attention_layer(d_model=32, n_heads=4, variant=variant, max_seq_len=16,
                            rope=block == "modern", bias=block == "classic")
    plain = UnfusedAttention(layer)
    x = torch.randn(2, 13, 32, requires_grad=True)
    y, grads = _loss_and_grads(layer, x)
    want, want_grads = _loss_and_grads(plain, x)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    for kind in ("weight", "bias") if block == "classic" else ("weight",):
        # The fused projection's gradient is the unfused projections' gradients stacked.
        parts = [want_grads.pop(f"projs.{i}.{kind}", None) for i in range(3)]
        want_grads[f"layer.qkv_proj.{kind}"] = torch.cat([p for p in parts if p is not None])
    assert {f"layer.{n}" if n != "x" else n for n in grads} == set(want_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name if name == "x" else f"layer.{name}"],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["mha", "table:sqa", "gqa@4"])
def test_compiled_layer_rotates_the_same_way(variant):
    """Under torch.compile RoPE takes its functional path (a copy into the buffer's view); the
    function and the gradients stay those of the eager layer."""
    torch.manual_seed(0)
    layer = attention_layer(d_model=32, n_heads=4, variant=variant, max_seq_len=16)
    x = torch.randn(2, 9, 32, requires_grad=True)
    y, grads = _loss_and_grads(layer, x)
    compiled, compiled_grads = _loss_and_grads(
        torch.compile(layer, backend="aot_eager", fullgraph=True), x)
    torch.testing.assert_close(compiled, y, rtol=1e-6, atol=1e-6)
    assert compiled_grads.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(compiled_grads[name], g, rtol=1e-5, atol=1e-6)


def saved_activation_bytes(module, x) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one forward, parameters
    left out: what a training step holds per layer until its backward runs."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(kept.values())


@pytest.mark.parametrize("variant", ["mha", "gqa", "xsqa", "table:mha"])
def test_fused_layer_keeps_no_more_for_the_backward_than_the_unfused_one(variant):
    """Before RoPE ran in place, the rotated q and k were new tensors and v a view of the fused
    output, which kept all of it alive: the q and k columns twice."""
    torch.manual_seed(0)
    layer = attention_layer(d_model=64, n_heads=4, variant=variant, max_seq_len=128)
    x = torch.randn(2, 128, 64, requires_grad=True)
    fused, plain = saved_activation_bytes(layer, x), saved_activation_bytes(
        UnfusedAttention(layer), x)
    assert fused <= plain
    if variant in ("mha", "gqa"):
        # q, k, v, x and the attention output, each (2, 128, heads, 16) in fp32; the unfused
        # layer holds the same, only in separate tensors. The rest is RoPE's cos and sin.
        rows = 2 * 128 * 16 * 4
        q_heads, kv_heads = 4, layer.spec.n_kv_heads
        expected = rows * (q_heads + 2 * kv_heads + 4 + q_heads)
        assert expected <= fused <= expected + 2 * 128 * 8 * 4 * 2
