"""The query probe on constructed models, as properties: a static table is all position and costs
nothing to replace by its mean; a query that ignores position has share ~0 and one that is a
function of position share 1; shares lie in [0, 1] and ignore the scale of W_q; the estimator
removes the bias a plug-in estimate has."""

import pytest
import torch

from conftest import LAYER_CASES, build, case_id
from sqt.probe import PositionMoments, pooled_share, query_probe, shares

VOCAB = 37


def windows(n=64, t=16, seed=0):
    """Token windows whose distribution does not depend on position (i.i.d. uniform ids)."""
    return torch.randint(0, VOCAB, (n, t + 1), generator=torch.Generator().manual_seed(seed))


def test_a_static_table_layer_is_all_position_and_its_mean_is_itself():
    report = query_probe(build("classic", ("sqt", "mha")), windows())
    table = report["layers"][0]
    assert table["q_share"] == pytest.approx([1.0] * 8, abs=1e-9)
    assert table["delta_loss"] == pytest.approx(0.0, abs=1e-6)
    assert report["layers"][1]["q_share_layer"] < 0.99   # a projection of content+position


@pytest.mark.parametrize("layers", ["idq", "mha", "rndq"])
def test_a_query_of_position_free_inputs_has_share_near_zero(layers):
    # Modern block: no position embedding, so layer 0 reads token embeddings only, and the
    # tokens' distribution is the same at every position.
    layer0 = query_probe(build("modern", layers), windows(256), ablate=False)["layers"][0]
    assert max(layer0["q_share"]) < 0.02 and layer0["k_share_layer"] < 0.02


def test_queries_that_are_a_function_of_position_have_share_one():
    model = build("classic", "mha")
    with torch.no_grad():
        model.tok_emb.weight.zero_()       # every input is its position embedding alone
    for layer in query_probe(model, windows())["layers"]:
        assert layer["q_share"] == pytest.approx([1.0] * 8, abs=1e-9)
        assert layer["k_share"] == pytest.approx([1.0] * 8, abs=1e-9)
        assert layer["delta_loss"] == pytest.approx(0.0, abs=1e-6)


def test_rope_makes_a_shared_query_direction_positional_after_rotation():
    # Every token's embedding is one common vector plus a little noise: before RoPE the query
    # barely varies with position (share ~0); after it, that common part turns with t.
    model = build("modern", "idq")
    with torch.no_grad():
        common = torch.randn(model.tok_emb.weight.shape[1], generator=torch.Generator()
                             .manual_seed(0))
        model.tok_emb.weight.copy_(common + 0.05 * torch.randn_like(model.tok_emb.weight))
    layer0 = query_probe(model, windows(128), ablate=False)["layers"][0]
    assert layer0["q_share_layer"] < 0.02 and layer0["q_share_rotated_layer"] > 0.5
    assert all(0.0 <= x <= 1.0 for x in layer0["q_share_rotated"])


def test_without_rope_the_rotated_share_is_the_share():
    for layer in query_probe(build("classic", ("sqt", "mha")), windows(), ablate=False)["layers"]:
        assert layer["q_share_rotated"] == layer["q_share"]
        assert layer["q_share_rotated_layer"] == layer["q_share_layer"]


def test_a_static_rotary_query_counts_as_positional():
    layer = query_probe(build("modern", "srq"), windows(8))["layers"][0]
    assert layer["q_share"] == pytest.approx([1.0] * 8, abs=1e-9)
    assert layer["delta_loss"] == pytest.approx(0.0, abs=1e-6)


def test_shares_do_not_depend_on_the_scale_of_wq():
    model, w = build("classic", "mha"), windows()
    before = query_probe(model, w, ablate=False)["layers"][1]
    with torch.no_grad():
        model.blocks[1].attn.qkv_proj.weight[:32] *= 7.0
        model.blocks[1].attn.qkv_proj.bias[:32] *= 7.0
    after = query_probe(model, w, ablate=False)["layers"][1]
    assert after["q_share"] == pytest.approx(before["q_share"], rel=1e-6)
    assert after["q_variance"] == pytest.approx(49 * before["q_variance"], rel=1e-6)


@pytest.mark.parametrize("layers", LAYER_CASES, ids=case_id)
def test_shares_lie_in_the_unit_interval(layers):
    report = query_probe(build("classic", layers), windows(3, 6), per_head=True)
    for layer in report["layers"]:
        for share in layer["q_share"] + layer["k_share"] + [layer["q_share_layer"]]:
            assert 0.0 <= share <= 1.0
        assert len(layer["delta_loss_heads"]) == len(layer["q_share"])


def _synthetic(n, t, positional_std, seed):
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(1, 1, t, 4, generator=g) * positional_std
    m = PositionMoments()
    m.add(signal + torch.randn(n, 1, t, 4, generator=g))
    return m


def test_the_estimator_removes_the_plug_in_bias():
    # No positional signal: a plug-in estimate credits position with ~1/N of the variance.
    n, t = 8, 64
    ours, plug_in = [], []
    for seed in range(40):
        m = _synthetic(n, t, 0.0, seed)
        between, within = m.variances()
        mu = m.mean()
        naive = (mu - mu.mean(0)).square().sum((0, 2)) / t
        ours.append(shares(between, within)[0])
        plug_in.append(float(naive[0] / (naive[0] + within[0])))
    assert sum(plug_in) / 40 > 0.8 / n
    assert sum(ours) / 40 < 0.2 / n
    # A known positional signal (the same draw _synthetic makes first) and unit noise per dim.
    m = _synthetic(4000, t, 0.5, 7)
    between, within = m.variances()
    signal = torch.randn(t, 4, generator=torch.Generator().manual_seed(7)) * 0.5
    truth = float((signal - signal.mean(0)).square().sum() / t)
    assert float(between[0]) == pytest.approx(truth, rel=0.05)
    assert float(within[0]) == pytest.approx(4.0, rel=0.05)
    assert pooled_share(between, within) == pytest.approx(truth / (truth + 4.0), rel=0.05)


def test_too_few_windows_or_wrong_ids_are_refused():
    model = build("classic", "mha")
    with pytest.raises(ValueError, match="at least 2"):
        query_probe(model, windows(1))
    with pytest.raises(ValueError, match="outside 0..36"):
        query_probe(model, windows() + VOCAB)
    with pytest.raises(ValueError, match="at most 24"):
        query_probe(model, windows(4, 30))
