"""The `flash` backend without a GPU: its custom-op wrapper computes attention and its gradients
when FlashAttention-4's kernels are replaced by the reference math (so the plumbing, layouts,
windows, head sharing and the compiled path are checked), `auto` follows its table, and asking
for `flash` where it cannot run is an error that says why."""

import dataclasses

import pytest
import torch

from conftest import small_config
from sqt import TransformerLM, flash
from sqt.kernels import AUTO_FLASH, attend, resolve_backend


def _reference_probs(q, k, v, scale, window_left):
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))
    kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    i = torch.arange(q.shape[1])
    back = i[:, None] - i[None, :]
    allowed = (back >= 0) & ((back <= window_left) if window_left >= 0 else True)
    scores = (qh @ kh.transpose(-2, -1) * scale).masked_fill(~allowed, float("-inf"))
    return qh, kh, vh, scores


def reference_forward(q, k, v, scale, window_left):
    """FA4's forward contract in the reference math: (B, T, H, D) in, (out, lse (B, H, T))."""
    _, _, vh, scores = _reference_probs(q, k, v, scale, window_left)
    out = torch.softmax(scores, dim=-1) @ vh
    return out.to(q.dtype).transpose(1, 2), scores.logsumexp(dim=-1)


def reference_backward(dout, q, k, v, out, lse, scale, window_left):
    """FA4's backward contract, written out (a custom op's kernel runs below autograd)."""
    qh, kh, vh, scores = _reference_probs(q, k, v, scale, window_left)
    p = torch.softmax(scores, dim=-1)
    do, o = dout.transpose(1, 2).float(), out.transpose(1, 2).float()
    ds = p * (do @ vh.transpose(-2, -1) - (do * o).sum(-1, keepdim=True))
    dq, dk, dv = ds @ kh * scale, ds.transpose(-2, -1) @ qh * scale, p.transpose(-2, -1) @ do
    B, H, T, D = dk.shape
    group = H // k.shape[2]
    dk, dv = (t.view(B, H // group, group, T, D).sum(2) for t in (dk, dv))
    return tuple(g.transpose(1, 2).to(q.dtype) for g in (dq, dk, dv))


@pytest.fixture
def reference_kernels(monkeypatch):
    """FA4 replaced by the reference math, and the device checks by 'available'."""
    monkeypatch.setattr(flash, "unavailable_reason", lambda *a, **kw: None)
    old = flash.use_kernels(flash.Kernels(reference_forward, reference_backward, "reference"))
    yield
    flash.use_kernels(old)


def _fused_qkv(nq, nkv, T=12, D=8, B=2):
    """q, k, v as the model makes them: (B, H, T, D) views of one (B, T, W) projection output."""
    fused = torch.randn(B, T, (nq + 2 * nkv) * D, dtype=torch.bfloat16)
    q, k, v = fused.split([nq * D, nkv * D, nkv * D], dim=-1)
    return [t.unflatten(-1, (-1, D)).transpose(1, 2).detach().requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("nq,nkv", [(8, 2), (2, 8), (4, 4)])
def test_custom_op_computes_attention_and_its_gradients(reference_kernels, nq, nkv, window):
    q, k, v = _fused_qkv(nq, nkv)
    out = attend(q, k, v, backend="flash", window=window)
    want = attend(q, k, v, backend="eager", window=window)
    assert out.shape == want.shape
    # FA4's output is (B, T, H, D) in memory: handed back as a view, no copy.
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(want, (q, k, v), grad)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_custom_ops_pass_torch_library_checks(reference_kernels):
    q, k, v = (t.detach().transpose(1, 2) for t in _fused_qkv(4, 2))
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 0.3, 3)
    torch.library.opcheck(flash.flash_fwd, args)
    q, k, v = (t.detach() for t in (q, k, v))         # no double backward
    out, lse = reference_forward(q, k, v, 0.3, 3)
    torch.library.opcheck(flash.flash_bwd, (torch.randn_like(out), q, k, v, out, lse, 0.3, 3))


def flash_model(**kw):
    torch.manual_seed(0)    # head_dim 8: the smallest FA4 takes
    return TransformerLM(small_config("modern", d_model=64, backend="flash", **kw))


def test_model_on_flash_equals_eager_and_compiles_as_one_op(reference_kernels):
    m = flash_model(layers=("gqa", "rsqa@5"))
    ref = TransformerLM(dataclasses.replace(m.config, backend="eager"))
    ref.load_state_dict(m.state_dict())
    x = torch.randint(0, 37, (2, 17))

    def loss_and_grads(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        return loss, torch.autograd.grad(loss, list(model.parameters()))
    loss, grads = loss_and_grads(m)
    want, want_grads = loss_and_grads(ref)
    torch.testing.assert_close(loss, want, rtol=1e-2, atol=1e-2)
    # aot_eager traces what inductor would (the custom op, its fake, its registered backward,
    # RoPE's compiled path) without generating code; fullgraph: no graph break anywhere.
    compiled, compiled_grads = loss_and_grads(torch.compile(m, backend="aot_eager",
                                                            fullgraph=True))
    torch.testing.assert_close(compiled, loss, rtol=1e-3, atol=1e-3)
    for a, b, c in zip(grads, want_grads, compiled_grads):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)
        torch.testing.assert_close(c, a, rtol=5e-2, atol=5e-3)


def test_without_a_backward_entry_the_public_function_runs(monkeypatch):
    """Where flash_attn.cute lacks the private forward/backward pair, its public autograd
    function is called as a whole (a graph break under torch.compile)."""
    monkeypatch.setattr(flash, "unavailable_reason", lambda *a, **kw: None)
    old = flash.use_kernels(flash.Kernels(lambda *a: reference_forward(*a)[0], None, "public"))
    try:
        q, k, v = _fused_qkv(4, 4)
        torch.testing.assert_close(attend(q, k, v, backend="flash"),
                                   attend(q, k, v, backend="eager"), rtol=2e-2, atol=2e-2)
    finally:
        flash.use_kernels(old)


def test_flash_where_it_cannot_run_says_why():
    with pytest.raises(ValueError, match=r"head_dim=4: FlashAttention-4 takes head dims 8\.\.256"):
        TransformerLM(small_config(backend="flash"))
    m = flash_model()                                   # builds anywhere: checks are per device
    with pytest.raises(ValueError, match=r"backend='flash': .*CUDA GPUs only, not on 'cpu'"):
        m(torch.randint(0, 37, (1, 5)))
    with pytest.raises(ValueError, match="CUDA GPUs only"):
        m.backends()


def test_flash_refuses_float32_and_untested_backward_head_dims(reference_kernels):
    q, k, v = (t.detach().float() for t in _fused_qkv(4, 4))
    with pytest.raises(ValueError, match=r"float32 tensors: FlashAttention-4 runs in float16 or "
                                         r"bfloat16"):
        attend(q, k, v, backend="flash")
    wrong = flash.head_dim_reason(16, grad=True)
    assert "is wrong at this head dim" in wrong and "train with backend 'sdpa'" in wrong
    assert "checked against the reference only at head dims 64, 128" in \
        flash.head_dim_reason(32, grad=True)
    assert flash.head_dim_reason(16) is None and flash.head_dim_reason(128, grad=True) is None


@pytest.fixture
def fa4_available(monkeypatch):
    monkeypatch.setattr(flash, "_device_status", lambda index: "")


@pytest.mark.parametrize("head_dim", sorted(AUTO_FLASH))
def test_auto_follows_its_table(fa4_available, head_dim):
    win, cuda = AUTO_FLASH[head_dim], "cuda:0"

    def pick(seq_len, grad, window=None, device=cuda, hd=head_dim):
        return resolve_backend("auto", window, device, head_dim=hd, seq_len=seq_len, grad=grad)
    assert pick(win.min_seq_train, grad=True) == "flash"
    assert pick(win.min_seq_train - 1, grad=True) == "sdpa"
    assert pick(win.min_seq_forward, grad=False) == "flash"
    assert pick(win.min_seq_forward - 1, grad=False) == "sdpa"
    assert pick(10**6, grad=True, window=128) == "flex"       # windows: not measured yet
    assert pick(10**6, grad=True, device="cpu") == "sdpa"
    assert pick(10**6, grad=False, hd=16) == "sdpa"           # slower forward, wrong backward


def test_auto_without_fa4_stays_on_sdpa_and_flash_says_why(monkeypatch):
    monkeypatch.setattr(flash, "_device_status",
                        lambda index: "flash-attn-4 is not installed (module flash_attn.cute)")
    assert resolve_backend("auto", None, "cuda:0", head_dim=128, seq_len=10**6,
                           grad=True) == "sdpa"
    with pytest.raises(ValueError, match="backend='flash': flash-attn-4 is not installed"):
        resolve_backend("flash", None, "cuda:0", head_dim=128)


def test_a_layer_reports_the_backend_it_runs_at_each_length(fa4_available):
    layer = TransformerLM(small_config("modern", d_model=256, n_heads=2)).blocks[0].attn
    cuda = torch.device("cuda", 0)
    least = AUTO_FLASH[128].min_seq_train
    assert layer.backend_for(cuda, seq_len=least, grad=True) == "flash"
    assert layer.backend_for(cuda, seq_len=least // 2, grad=True) == "sdpa"
    hd16 = TransformerLM(small_config("modern", d_model=128, backend="flash")).blocks[0].attn
    assert hd16.backend_for(cuda, seq_len=64) == "flash"
    with pytest.raises(ValueError, match="is wrong at this head dim"):
        hd16.backend_for(cuda, seq_len=64, grad=True)


def test_the_gpu_check_of_flash_runs_on_reference_kernels(reference_kernels, monkeypatch):
    """bench.gpu_check's flash part, end to end on the CPU with the reference in FA4's place:
    what it records, and that a right kernel reads as bf16 rounding."""
    from bench import gpu_check_flash as check
    monkeypatch.setattr(check, "SEQ", 32)
    monkeypatch.setattr(check, "BATCH", 2)
    row = check.check_case(torch.device("cpu"), 64, "sqa@128", True)
    assert row["backends"] == ["flash"] and row["within_bf16_rounding"]
    assert row["grad_max_rel"] < 0.05 and row["out_rel"] < 0.05 and row["grad_max_abs"] > 0
    forward_only = check.check_case(torch.device("cpu"), 16, "table:xsqa", False)
    assert "grad_max_rel" not in forward_only and forward_only["within_bf16_rounding"]


def test_the_device_probe_is_a_constant_to_the_compiler(monkeypatch):
    """Compiled code takes the FA4 device probe's answer as a constant rather than tracing the
    import and the capability query behind it (no graph break in the compiled training step)."""
    monkeypatch.setitem(flash._device_status_cache, 7, "")
    f = torch.compile(lambda x: x + (1 if flash._device_status(7) == "" else 2),
                      backend="eager", fullgraph=True)
    assert f(torch.zeros(1)).item() == 1
