"""Baselines: magnitude, LAMP, SNIP-magnitude, random -- same per-structure format as local scores."""

from __future__ import annotations

import pytest
import torch

import elastic_fx as efx
from elastic_fx.scoring.baselines import (
    lamp_entry_scores,
    lamp_scores,
    magnitude_scores,
    random_scores,
    snip_scores,
)
from elastic_fx.scoring.local import LocalScores, local_scores
from zoo import ZOO
from oracles import per_structure_sum


@pytest.fixture(scope="module")
def vit():
    model, inputs = ZOO["hand_separate_qkv"].build()
    gm = efx.trace(model, inputs)
    return model, gm, efx.discover(gm)


_per_structure = per_structure_sum


def _assert_scores(ls, ref, rtol=1e-5):
    heads, neurons = ref
    assert sorted(ls.head_scores) == sorted(heads) and sorted(ls.neuron_scores) == sorted(neurons)
    for b in heads:
        torch.testing.assert_close(ls.head_scores[b], heads[b], rtol=rtol, atol=1e-12)
        torch.testing.assert_close(ls.neuron_scores[b], neurons[b], rtol=rtol, atol=1e-12)


def _params(gm):
    return dict(gm.named_parameters())


def test_magnitude_is_the_squared_l2_norm_of_each_structure(vit):
    _, gm, smap = vit
    ls = magnitude_scores(gm, structures=smap)
    _assert_scores(ls, _per_structure(smap, {n: p.detach().square() for n, p in _params(gm).items()}))
    assert (ls.method, ls.mode, ls.num_images) == ("magnitude", "none", 0)


def test_lamp_entry_scores_follow_the_definition():
    w = torch.tensor([[2.0, -1.0], [3.0, -2.0]])
    # squares 4, 1, 9, 4; ">=" denominators: 4 -> 4+4+9, 1 -> 18, 9 -> 9 (ties share 17)
    want = torch.tensor([[4 / 17, 1 / 18], [1.0, 4 / 17]], dtype=torch.float64)
    torch.testing.assert_close(lamp_entry_scores(w), want)
    torch.testing.assert_close(lamp_entry_scores(torch.zeros(3)), torch.zeros(3, dtype=torch.float64))


def test_lamp_sums_entry_scores_per_structure_and_the_largest_weight_scores_one(vit):
    _, gm, smap = vit
    ls = lamp_scores(gm, structures=smap)
    entries = {}
    for n in {s.name for b in smap.blocks for _, g in b.groups() for s in g.slices}:
        p = gm.get_parameter(n)
        sq = p.detach().double().reshape(-1).square()
        # the definition, literally: w_i^2 / sum of w_j^2 over every j with |w_j| >= |w_i|
        denom = torch.cat([torch.where(sq[None, :] >= c[:, None], sq[None, :], 0.0).sum(dim=1) for c in sq.split(512)])
        entries[n] = (sq / denom).view(p.shape)
        assert entries[n].max() == 1.0
    _assert_scores(ls, _per_structure(smap, entries))
    assert ls.method == "lamp"


def test_snip_is_weight_times_mean_gradient(vit):
    _, gm, smap = vit
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def loss_fn(model, batch):
        return model(batch).square().mean()

    ls = snip_scores(gm, x, loss_fn=loss_fn, batch_size=2, structures=smap, progress=False)
    params = _params(gm)
    names = list(params)
    mean = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(0, 5, 2):
        xb = x[i:i + 2]
        for n, g in zip(names, torch.autograd.grad(loss_fn(gm, xb), [params[n] for n in names])):
            mean[n] += g * len(xb) / 5
    _assert_scores(ls, _per_structure(smap, {n: (params[n].detach() * mean[n]).abs() for n in names}), rtol=1e-4)
    assert (ls.method, ls.mode, ls.num_images) == ("snip", "per-batch", 5)


def test_random_scores_are_seeded(vit):
    _, gm, smap = vit
    a, b, c = random_scores(smap, 0), random_scores(gm, 0, structures=smap), random_scores(smap, 1)
    for blk in a.head_scores:
        assert torch.equal(a.head_scores[blk], b.head_scores[blk])
        assert torch.equal(a.neuron_scores[blk], b.neuron_scores[blk])
        assert ((a.neuron_scores[blk] >= 0) & (a.neuron_scores[blk] < 1)).all()
    assert not torch.equal(a.neuron_scores[0], c.neuron_scores[0])


@pytest.mark.parametrize("method", ["magnitude", "lamp", "snip", "random"])
def test_every_baseline_has_the_local_scores_format(vit, method, tmp_path):
    _, gm, smap = vit
    x = torch.randn(3, 3, 32, 32)
    ls = local_scores(gm, x, method=method, batch_size=2, progress=False,
                      dino=efx.scoring.dino.DinoConfig(n_global=2, n_local=1))
    assert ls.method == method and ls.fingerprint == smap.fingerprint()
    for b in smap.blocks:
        assert ls.head_scores[b.index].shape == (b.attention.num_heads,)
        assert ls.neuron_scores[b.index].shape == (b.mlp.hidden_features,)
        assert torch.isfinite(ls.head_scores[b.index]).all() and (ls.neuron_scores[b.index] >= 0).all()
    back = LocalScores.load(ls.save(tmp_path / f"{method}.safetensors"), smap)
    assert back.method == method and torch.equal(back.head_scores[1], ls.head_scores[1])
