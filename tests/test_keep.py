"""keep.py: the vectorised keep validation gives exactly the per-index answers."""

import pytest
import torch

import elastic_fx as efx
from elastic_fx.keep import keep_tensors, normalize_keep
from zoo import build


@pytest.fixture(scope="module")
def smap():
    model, inputs = build("timm_vit")
    return efx.discover(efx.trace(model, inputs))


def _naive(smap, keeps):
    """The masks built one index at a time."""
    heads = {b.index: torch.zeros(len(keeps), b.attention.num_heads, dtype=torch.bool) for b in smap.blocks}
    neurons = {b.index: torch.zeros(len(keeps), b.mlp.hidden_features, dtype=torch.bool) for b in smap.blocks}
    for p, keep in enumerate(keeps):
        for b in smap.blocks:
            entry = keep.get(b.index, {})
            for kind, masks, size in (("heads", heads, b.attention.num_heads), ("neurons", neurons,
                                                                                 b.mlp.hidden_features)):
                for i in entry.get(kind, range(size)):
                    masks[b.index][p, int(i)] = True
    return heads, neurons


def test_keep_tensors_match_index_by_index(smap):
    g = torch.Generator().manual_seed(0)
    keeps = []
    for p in range(6):
        keep = {}
        for b in smap.blocks:
            n = b.mlp.hidden_features
            kept = torch.randperm(n, generator=g)[: 1 + p * n // 8]
            # lists of ints, int tensors and unsorted orders all take the fast path
            keep[b.index] = {"neurons": kept if p % 2 else kept.tolist(), "heads": [b.attention.num_heads - 1, 0]}
        keeps.append(keep)
    keeps.append({})
    got, want = keep_tensors(smap, keeps), _naive(smap, keeps)
    for g_, w_ in zip(got, want):
        assert g_.keys() == w_.keys() and all(torch.equal(g_[k], w_[k]) for k in g_)
    full = normalize_keep(smap, keeps[1])
    assert all(type(i) is int for i in full[0]["neurons"]) and full[0]["neurons"] == sorted(full[0]["neurons"])


@pytest.mark.parametrize("bad,match", [
    ([True, 1], "not an integer"),  # a bool is refused even beside ints
    ([0, 0.5], "not a whole number"),
    (torch.tensor([0.0, 1.5]), "not a whole number"),
    ([1, 1], r"duplicate heads indices \[1\]"),
    (torch.tensor([0, 99]), r"out of range"),
    ([], "removes every head"),
])
def test_bad_indices_are_refused_on_every_path(smap, bad, match):
    with pytest.raises(efx.SliceError, match=match):
        keep_tensors(smap, [{0: {"heads": bad}}])
