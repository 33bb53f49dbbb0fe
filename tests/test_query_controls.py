"""The parameter-free query controls: the identity query is the input's own features, the random
query is a frozen draw that depends on (query_seed, layer) alone and travels with the weights."""

import pytest
import torch

from conftest import build
from sqt import LMConfig, TransformerLM
from sqt.checkpoint import load_model, save_model


@pytest.mark.parametrize("layers, n_q", [("idq", 8), ("identity:xsqa", 2), ("identity:rsqa", 2)])
def test_identity_query_is_the_first_features_of_the_input(layers, n_q):
    attn = build("modern", layers).blocks[0].attn
    x = torch.randn(2, 5, 32)
    q = attn.queries(x)                                    # (B, n_q, T, head_dim)
    assert q.shape == (2, n_q, 5, 4)
    torch.testing.assert_close(q.transpose(1, 2).reshape(2, 5, -1), x[..., :n_q * 4],
                               rtol=0, atol=0)


def test_identity_query_wider_than_the_input_is_refused():
    with pytest.raises(ValueError, match=r"layer 0: identity:16/16.*d_model=32"):
        LMConfig(d_model=32, n_heads=8, layers="identity:16/16")


def test_controls_have_no_query_parameters():
    for layers in ("idq", "rndq"):
        m = build("classic", layers)
        assert not [n for n, _ in m.named_parameters() if "q_" in n.split(".")[-1]]
        assert m.blocks[0].attn.qkv_proj.weight.shape[0] == 2 * 32     # keys and values only
    names = dict(build("classic", "rndq").named_buffers())
    assert names["blocks.1.attn.q_random"].shape == (32, 32)


def _draws(seed_before: int, **kw):
    torch.manual_seed(seed_before)
    m = TransformerLM(LMConfig(vocab_size=11, d_model=32, n_heads=8, n_layers=2,
                               layers="random:sqa", **kw))
    return [b.attn.q_random for b in m.blocks]


def test_random_query_is_a_function_of_query_seed_and_layer():
    a, b = _draws(0), _draws(99)          # whatever the global RNG drew before
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])    # each layer its own draw
    assert not torch.equal(a[0], _draws(0, query_seed=1)[0])
    assert a[0].std().item() == pytest.approx(0.02, rel=0.15)    # W_q's init scale


def test_random_query_travels_with_the_checkpoint(tmp_path):
    m = build("modern", ("rndq", "random:xsqa"), query_seed=5)
    with torch.no_grad():
        m.blocks[0].attn.q_random.mul_(3)   # not the draw any more: the file must carry it
    save_model(tmp_path, m)
    back, _ = load_model(tmp_path)
    x = torch.randint(0, 37, (2, 9))
    torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)


def test_controls_train_no_query_weights():
    from sqt.runconfig import TrainConfig
    from sqt.train import make_optimizer
    m = build("classic", ("idq", "rndq"))
    opt = make_optimizer(m, TrainConfig(), torch.device("cpu"))
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in m.parameters()}
    assert all(id(b) not in trained for b in m.buffers())
