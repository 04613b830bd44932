"""Budgets -> keep-masks (elastic_fx/budget.py).

Most tests use small hand-built StructureMaps (instant, and they can hold what a real model
rarely does: a non-prunable FFN, uneven blocks). The end-to-end tests trace a tiny timm ViT
once and check that the masks slice and that the parameter count matches.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch

import elastic_fx as efx
from elastic_fx.budget import (
    Floors,
    achieved,
    budget_masks,
    max_sparsity,
    nested_masks,
    structure_order,
)
from elastic_fx.errors import BudgetError, NumericalError, ScoresError
from elastic_fx.structures import AttentionGroup, Block, MlpGroup, ParamSlice, StructureMap

EMBED, HEAD_DIM, TOKENS = 16, 4, 5
FIXED_PARAMS, FIXED_FLOPS = 1000, 50_000


# ----------------------------------------------------------------------------- helpers
def _attention(b: int, heads: int) -> AttentionGroup:
    width = heads * HEAD_DIM
    qkv = torch.arange(3 * width).reshape(3, heads, HEAD_DIM).permute(1, 0, 2).reshape(heads, -1)
    slices = (
        ParamSlice(f"blocks.{b}.attn.qkv.weight", (3 * width, EMBED), 0, qkv),
        ParamSlice(f"blocks.{b}.attn.qkv.bias", (3 * width,), 0, qkv),
        ParamSlice(f"blocks.{b}.attn.proj.weight", (EMBED, width), 1, torch.arange(width).reshape(heads, HEAD_DIM)),
    )
    return AttentionGroup(heads, HEAD_DIM, f"blocks.{b}.attn.proj", (f"blocks.{b}.attn.qkv",), slices, TOKENS, TOKENS, "sdpa")


def _mlp(b: int, hidden: int, prunable: bool = True) -> MlpGroup:
    rows = torch.arange(hidden).reshape(hidden, 1)
    slices = (
        ParamSlice(f"blocks.{b}.mlp.fc1.weight", (hidden, EMBED), 0, rows),
        ParamSlice(f"blocks.{b}.mlp.fc1.bias", (hidden,), 0, rows),
        ParamSlice(f"blocks.{b}.mlp.fc2.weight", (EMBED, hidden), 1, rows),
    )
    return MlpGroup(
        hidden, f"blocks.{b}.mlp.fc2", (f"blocks.{b}.mlp.fc1",), slices, TOKENS,
        prunable=prunable, reason=None if prunable else "test: output feeds a residual of another width",
    )


def synthetic_map(spec: Sequence[Tuple[Optional[int], Optional[int], bool]]) -> StructureMap:
    """One block per ``(heads or None, hidden or None, mlp_prunable)``."""
    blocks = [
        Block(i, None if h is None else _attention(i, h), None if f is None else _mlp(i, f, p))
        for i, (h, f, p) in enumerate(spec)
    ]
    smap = StructureMap(blocks, total_params=0, fixed_flops=FIXED_FLOPS)
    everything = sum(
        (b.attention.num_heads * b.attention.params_per_head if b.attention else 0)
        + (b.mlp.hidden_features * b.mlp.params_per_neuron if b.mlp else 0)
        for b in blocks
    )
    smap.total_params = everything + FIXED_PARAMS
    return smap


def random_scores(smap: StructureMap, seed: int = 0) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    heads = {b.index: torch.rand(b.attention.num_heads, generator=g) for b in smap.blocks if b.attention}
    neurons = {b.index: torch.rand(b.mlp.hidden_features, generator=g) for b in smap.blocks if b.mlp}
    return heads, neurons


def constant_scores(smap: StructureMap, head: float = 1.0, neuron: float = 1.0):
    heads = {b.index: torch.full((b.attention.num_heads,), head) for b in smap.blocks if b.attention}
    neurons = {b.index: torch.full((b.mlp.hidden_features,), neuron) for b in smap.blocks if b.mlp}
    return heads, neurons


def kept_set(keep) -> set:
    return {(b, kind, i) for b, entry in keep.items() for kind, idx in entry.items() for i in idx}


def per_structure_params(smap: StructureMap) -> List[int]:
    return [g.params_per_head if kind == "heads" else g.params_per_neuron for b in smap.blocks for kind, g in b.groups()]


@pytest.fixture
def smap() -> StructureMap:
    # Uneven on purpose: 15 heads (0.2 * 15 is 3.0000000000000004 in floats), 7 hidden.
    return synthetic_map([(4, 24, True), (6, 40, True), (15, 7, True), (2, 32, True)])


# ----------------------------------------------------------------------------- floors
def test_floor_counts() -> None:
    f = Floors()
    assert f.min_kept(4, "heads") == 1  # ceil(0.8)
    assert f.min_kept(15, "heads") == 3  # not 4: float noise in 0.2 * 15 is ignored
    assert f.min_kept(12, "heads") == 3
    assert f.min_kept(3072, "neurons") == 154
    assert f.min_kept(7, "neurons") == 1
    assert Floors(min_heads=5).min_kept(4, "heads") == 4  # never more than the group has
    assert Floors(head_fraction=0.0, min_heads=2).min_kept(10, "heads") == 2
    with pytest.raises(BudgetError):
        f.min_kept(4, "layers")


@pytest.mark.parametrize(
    "kwargs", [{"head_fraction": -0.1}, {"neuron_fraction": 1.5}, {"min_heads": 0}, {"min_neurons": 1.5}, {"head_fraction": math.nan}]
)
def test_bad_floors(kwargs) -> None:
    with pytest.raises(BudgetError):
        Floors(**kwargs)


# ----------------------------------------------------------------------------- order
def test_order_follows_scores(smap) -> None:
    hs, ns = random_scores(smap)
    order = structure_order(smap, hs, ns)
    values = [(hs if kind == "heads" else ns)[b][i].item() for b, kind, i in order]
    assert values == sorted(values)
    assert len(order) == sum(g.size for b in smap.blocks for _, g in b.groups())
    assert len(set(order)) == len(order)


def test_ties_are_broken_by_block_kind_index(smap) -> None:
    hs, ns = constant_scores(smap)
    order = structure_order(smap, hs, ns)
    expected = [
        (b.index, kind, i) for b in smap.blocks for kind, g in b.groups() for i in range(g.size)
    ]  # blocks in index order, a block's heads before its neurons, lower index first
    assert order == expected
    assert structure_order(smap, hs, ns) == order
    # Equal scores in different dtypes rank identically.
    hs64 = {b: v.double() for b, v in hs.items()}
    assert structure_order(smap, hs64, ns) == order


def test_tie_across_blocks_earlier_block_first(smap) -> None:
    hs, ns = constant_scores(smap, head=5.0, neuron=5.0)
    hs[3][1] = 0.5
    ns[1][7] = 0.5
    ns[0][3] = 0.5
    assert structure_order(smap, hs, ns)[:3] == [(0, "neurons", 3), (1, "neurons", 7), (3, "heads", 1)]


def test_equal_scores_same_masks_twice(smap) -> None:
    hs, ns = constant_scores(smap)
    a = budget_masks(smap, hs, ns, sparsity=0.37)
    b = budget_masks(smap, {k: v.clone() for k, v in hs.items()}, ns, sparsity=0.37)
    assert a == b


# ----------------------------------------------------------------------------- score errors
def test_missing_scores_name_block_and_size(smap) -> None:
    hs, ns = random_scores(smap)
    del ns[2]
    with pytest.raises(ScoresError, match=r"block 2.*7 scores"):
        budget_masks(smap, hs, ns, sparsity=0.2)


def test_missized_scores(smap) -> None:
    hs, ns = random_scores(smap)
    hs[1] = torch.rand(5)
    with pytest.raises(ScoresError, match=r"head_scores\[1\].*6"):
        structure_order(smap, hs, ns)
    hs[1] = torch.rand(2, 3)  # right count, wrong shape
    with pytest.raises(ScoresError):
        structure_order(smap, hs, ns)


def test_unknown_block_and_not_a_dict(smap) -> None:
    hs, ns = random_scores(smap)
    with pytest.raises(ScoresError, match="block 9"):
        structure_order(smap, {**hs, 9: torch.rand(4)}, ns)
    with pytest.raises(ScoresError, match="dict"):
        structure_order(smap, torch.rand(4, 4), ns)


def test_nan_scores(smap) -> None:
    hs, ns = random_scores(smap)
    ns[1][5] = math.nan
    with pytest.raises(NumericalError, match=r"neuron_scores\[1\].*\[5\]"):
        budget_masks(smap, hs, ns, sparsity=0.2)


def test_scores_accept_lists_and_numpy_keys(smap) -> None:
    hs, ns = random_scores(smap)
    as_lists = {np.int64(b): v.tolist() for b, v in hs.items()}
    assert budget_masks(smap, as_lists, ns, sparsity=0.3) == budget_masks(smap, hs, ns, sparsity=0.3)


def test_non_prunable_ffn_is_excluded() -> None:
    smap = synthetic_map([(4, 24, True), (4, 24, False), (None, 16, True), (3, None, True)])
    hs, ns = random_scores(smap)
    order = structure_order(smap, hs, ns)
    assert not any(b == 1 and kind == "neurons" for b, kind, _ in order)
    del ns[1]  # a non-prunable FFN needs no scores
    keep = budget_masks(smap, hs, ns, sparsity=0.5)
    assert set(keep) == {0, 1, 2, 3}
    assert set(keep[1]) == {"heads"} and set(keep[2]) == {"neurons"} and set(keep[3]) == {"heads"}
    assert achieved(smap, keep)["sparsity"] >= 0.5
    with pytest.raises(ScoresError, match="no attention"):
        structure_order(smap, {**hs, 2: torch.rand(4)}, ns)


# ----------------------------------------------------------------------------- sparsity
def test_sparsity_zero_keeps_everything(smap) -> None:
    hs, ns = random_scores(smap)
    keep = budget_masks(smap, hs, ns, sparsity=0.0)
    assert keep == {b.index: {kind: list(range(g.size)) for kind, g in b.groups()} for b in smap.blocks}
    assert achieved(smap, keep)["params"] == smap.total_params


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, math.nan, math.inf, "0.3", True])
def test_sparsity_out_of_range(smap, bad) -> None:
    hs, ns = random_scores(smap)
    with pytest.raises(BudgetError, match="sparsity"):
        budget_masks(smap, hs, ns, sparsity=bad)


def test_exactly_one_budget(smap) -> None:
    hs, ns = random_scores(smap)
    with pytest.raises(BudgetError, match="exactly one"):
        budget_masks(smap, hs, ns)
    with pytest.raises(BudgetError, match="exactly one"):
        budget_masks(smap, hs, ns, sparsity=0.3, flops=0.5)
    with pytest.raises(BudgetError, match="exactly one"):
        budget_masks(smap, hs, ns, sparsity=0.3, head_ratio=0.2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masks_are_nested(smap, seed) -> None:
    hs, ns = random_scores(smap, seed)
    targets = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    walks = nested_masks(smap, hs, ns, targets)
    singles = [budget_masks(smap, hs, ns, sparsity=s) for s in targets]
    assert walks == singles
    sets = [kept_set(k) for k in singles]
    for denser, sparser in zip(sets, sets[1:]):
        assert sparser < denser  # strict subset: every step removes something here
    # The order of the requested budgets does not matter.
    assert nested_masks(smap, hs, ns, targets[::-1]) == singles[::-1]


@pytest.mark.parametrize("target", [0.05, 0.1, 0.25, 0.3, 0.45, 0.6])
def test_achieved_within_one_structure(smap, target) -> None:
    hs, ns = random_scores(smap, 3)
    got = achieved(smap, budget_masks(smap, hs, ns, sparsity=target))["sparsity"]
    biggest = max(per_structure_params(smap)) / smap.prunable_params
    assert target <= got < target + biggest


def test_count_is_weighted_by_parameters() -> None:
    smap = synthetic_map([(4, 64, True), (4, 64, True)])
    per_head = smap.blocks[0].attention.params_per_head
    per_neuron = smap.blocks[0].mlp.params_per_neuron
    assert per_head > 5 * per_neuron  # heads own many more parameters than neurons
    # Heads least important: the smallest budget removes ONE head, not as many heads as neurons.
    hs, ns = constant_scores(smap, head=0.0, neuron=1.0)
    keep = budget_masks(smap, hs, ns, sparsity=0.01)
    assert achieved(smap, keep)["params"] == smap.total_params - per_head
    # Neurons least important: just enough neurons to cover the target.
    hs, ns = constant_scores(smap, head=1.0, neuron=0.0)
    target = per_head / smap.prunable_params
    keep = budget_masks(smap, hs, ns, sparsity=target)
    removed = sum(64 - len(keep[b]["neurons"]) for b in keep)
    assert removed == math.ceil(per_head / per_neuron)
    assert all(len(keep[b]["heads"]) == 4 for b in keep)


def test_exact_boundary_does_not_overshoot() -> None:
    smap = synthetic_map([(4, 20, True)] * 3)
    hs, ns = constant_scores(smap, head=1.0, neuron=0.0)
    per_neuron = smap.blocks[0].mlp.params_per_neuron
    # For n = 5, 10, 20, 29, (n * per / P) * P rounds to just above n * per in floats.
    for n in (1, 5, 10, 20, 29):
        keep = budget_masks(smap, hs, ns, sparsity=n * per_neuron / smap.prunable_params)
        assert smap.total_params - achieved(smap, keep)["params"] == n * per_neuron


def test_floors_hold_at_high_targets(smap) -> None:
    # Block 2 is the least important by far: a walk without floors would empty it.
    hs, ns = random_scores(smap)
    hs[2] -= 10
    ns[2] -= 10
    floors = Floors()
    for target in (0.2, 0.5, 0.7, max_sparsity(smap) - 1e-6):
        keep = budget_masks(smap, hs, ns, sparsity=target)
        for b in smap.blocks:
            assert len(keep[b.index]["heads"]) >= max(1, math.ceil(0.2 * b.attention.num_heads - 1e-9))
            assert len(keep[b.index]["neurons"]) >= max(1, math.ceil(0.05 * b.mlp.hidden_features))
    # At the maximum every block sits exactly on its floor.
    keep = budget_masks(smap, hs, ns, sparsity=max_sparsity(smap))
    for b in smap.blocks:
        assert len(keep[b.index]["heads"]) == floors.min_kept(b.attention.num_heads, "heads")
        assert len(keep[b.index]["neurons"]) == floors.min_kept(b.mlp.hidden_features, "neurons")


def test_custom_floors(smap) -> None:
    hs, ns = random_scores(smap)
    floors = Floors(head_fraction=0.5, neuron_fraction=0.5)
    keep = budget_masks(smap, hs, ns, sparsity=0.4, floors=floors)
    for b in smap.blocks:
        assert len(keep[b.index]["heads"]) >= math.ceil(b.attention.num_heads / 2)
        assert len(keep[b.index]["neurons"]) >= math.ceil(b.mlp.hidden_features / 2)
    assert max_sparsity(smap, floors) < max_sparsity(smap)


def test_unreachable_sparsity_names_the_maximum(smap) -> None:
    hs, ns = random_scores(smap)
    most = max_sparsity(smap)
    assert 0.5 < most < 1.0
    with pytest.raises(BudgetError, match=f"{most:.4f}"):
        budget_masks(smap, hs, ns, sparsity=min(0.999, most + 0.01))
    tight = Floors(head_fraction=0.9, neuron_fraction=0.9)
    with pytest.raises(BudgetError, match=f"{max_sparsity(smap, tight):.4f}"):
        nested_masks(smap, hs, ns, [0.05, 0.3], floors=tight)


def test_max_sparsity_matches_the_walk(smap) -> None:
    floors = Floors()
    removable = sum(
        (g.size - floors.min_kept(g.size, kind)) * (g.params_per_head if kind == "heads" else g.params_per_neuron)
        for b in smap.blocks
        for kind, g in b.groups()
    )
    assert max_sparsity(smap) == pytest.approx(removable / smap.prunable_params)


# ----------------------------------------------------------------------------- FLOPs
def test_flops_budget(smap) -> None:
    hs, ns = random_scores(smap, 4)
    dense = smap.flops()
    targets = [0.9, 0.75, 0.6, 0.5]
    masks = nested_masks(smap, hs, ns, flops=targets)
    for f, keep in zip(targets, masks):
        assert keep == budget_masks(smap, hs, ns, flops=f)
        got = achieved(smap, keep)
        assert got["flops"] <= f * dense * (1 + 1e-9)
        assert got["flops_fraction"] == pytest.approx(got["flops"] / dense)
        assert got["gflops"] == pytest.approx(got["flops"] / 1e9)
    sets = [kept_set(k) for k in masks]
    assert all(b <= a for a, b in zip(sets, sets[1:]))
    # Minimal: the sparsity walk stops at the same point for the sparsity this achieves.
    s = achieved(smap, masks[1])["sparsity"]
    assert kept_set(budget_masks(smap, hs, ns, sparsity=s)) == sets[1]
    assert budget_masks(smap, hs, ns, flops=1.0) == budget_masks(smap, hs, ns, sparsity=0.0)


@pytest.mark.parametrize("bad", [0.0, -0.2, 1.5, math.nan])
def test_flops_out_of_range(smap, bad) -> None:
    hs, ns = random_scores(smap)
    with pytest.raises(BudgetError, match="flops"):
        budget_masks(smap, hs, ns, flops=bad)


def test_flops_unreachable(smap) -> None:
    hs, ns = random_scores(smap)
    with pytest.raises(BudgetError, match="at least"):
        budget_masks(smap, hs, ns, flops=0.01)


# ----------------------------------------------------------------------------- ratios
def test_ratios_remove_the_right_counts(smap) -> None:
    hs, ns = random_scores(smap, 5)
    n_heads = sum(b.attention.num_heads for b in smap.blocks)  # 27
    n_neurons = sum(b.mlp.hidden_features for b in smap.blocks)  # 103
    keep = budget_masks(smap, hs, ns, mlp_ratio=0.35, head_ratio=0.2)
    gone_heads = {(b, i) for b in hs for i in range(len(hs[b])) if i not in keep[b]["heads"]}
    gone_neurons = {(b, i) for b in ns for i in range(len(ns[b])) if i not in keep[b]["neurons"]}
    assert len(gone_heads) == math.ceil(0.2 * n_heads)
    assert len(gone_neurons) == math.ceil(0.35 * n_neurons)
    # Each kind is ranked on its own: the lowest-scored heads / neurons went (floors allowing).
    floors = Floors()
    lowest_heads = sorted((v.item(), b, i) for b in hs for i, v in enumerate(hs[b]))
    left = {b: hs[b].numel() for b in hs}
    expected = set()
    for _, b, i in lowest_heads:
        if len(expected) == len(gone_heads):
            break
        if left[b] > floors.min_kept(hs[b].numel(), "heads"):
            expected.add((b, i))
            left[b] -= 1
    assert gone_heads == expected


def test_one_ratio_alone(smap) -> None:
    hs, ns = random_scores(smap)
    keep = budget_masks(smap, hs, ns, head_ratio=0.3)
    assert all(len(keep[b.index]["neurons"]) == b.mlp.hidden_features for b in smap.blocks)
    assert budget_masks(smap, hs, ns, mlp_ratio=0.0, head_ratio=0.0) == budget_masks(smap, hs, ns, sparsity=0.0)


def test_ratio_ties_do_not_prune_everything() -> None:
    # The reference prunes every structure tied at its threshold: with all-equal scores,
    # any head_ratio > 0 would remove all heads. Here exactly ceil(ratio * total) go.
    smap = synthetic_map([(4, 20, True)] * 3)
    hs, ns = constant_scores(smap)
    keep = budget_masks(smap, hs, ns, mlp_ratio=0.1, head_ratio=0.25)
    assert sum(4 - len(keep[b]["heads"]) for b in keep) == 3
    assert sum(20 - len(keep[b]["neurons"]) for b in keep) == 6


def test_ratio_at_one_minus_floor_keeps_the_floor() -> None:
    # The reference empties every block for a ratio >= 1 - floor. With a floor of 25 % of
    # 4 heads, head_ratio = 0.75 is exactly reachable: every block keeps exactly one head.
    smap = synthetic_map([(4, 20, True)] * 3)
    hs, ns = random_scores(smap)
    floors = Floors(head_fraction=0.25, neuron_fraction=0.05)
    keep = budget_masks(smap, hs, ns, mlp_ratio=0.95, head_ratio=0.75, floors=floors)
    assert all(len(keep[b]["heads"]) == 1 for b in keep)
    assert all(len(keep[b]["neurons"]) == 1 for b in keep)
    # Beyond what the floors allow: an error naming the maximum, never an empty block.
    with pytest.raises(BudgetError, match=r"head_ratio.*0\.7500"):
        budget_masks(smap, hs, ns, head_ratio=0.8)
    with pytest.raises(BudgetError, match="mlp_ratio"):
        budget_masks(smap, hs, ns, mlp_ratio=1.0)


def test_ratio_pairs_are_nested(smap) -> None:
    hs, ns = random_scores(smap, 6)
    pairs = [(0.15, 0.0), (0.25, 0.1), (0.35, 0.2), (0.45, 0.3), (0.55, 0.4), (0.65, 0.5)]
    sets = [kept_set(budget_masks(smap, hs, ns, mlp_ratio=m, head_ratio=h)) for m, h in pairs]
    assert all(b < a for a, b in zip(sets, sets[1:]))


# ----------------------------------------------------------------------------- a real model
@pytest.fixture(scope="module")
def vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, mlp_ratio=2
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = efx.trace(model, (x,))
    return gm, efx.discover(gm), x


def test_masks_slice_to_the_predicted_size(vit) -> None:
    gm, smap, x = vit
    hs, ns = random_scores(smap, 7)
    hs[2] -= 1  # make the last block the first to go, so some block hits its floor at 0.6
    ns[2] -= 1
    keep_40, keep_60 = nested_masks(smap, hs, ns, [0.4, 0.6])
    assert 0.4 <= achieved(smap, keep_40)["sparsity"] < 0.4 + smap.blocks[0].attention.params_per_head / smap.prunable_params
    assert kept_set(keep_60) < kept_set(keep_40)
    small = efx.slice(gm, smap, keep_60)  # one slice per test: slicing takes ~2 s on a CPU
    assert sum(p.numel() for p in small.parameters()) == smap.params(keep_60) == achieved(smap, keep_60)["params"]
    assert small(x).shape == gm(x).shape
    assert len(keep_60[2]["heads"]) == 1 and len(keep_60[2]["neurons"]) == math.ceil(0.05 * 96)


def test_flops_masks_slice(vit) -> None:
    gm, smap, x = vit
    hs, ns = random_scores(smap, 8)
    keep = budget_masks(smap, hs, ns, flops=0.7)
    assert achieved(smap, keep)["flops"] <= 0.7 * smap.flops() * (1 + 1e-9)
    small = efx.slice(gm, smap, keep)
    assert sum(p.numel() for p in small.parameters()) == smap.params(keep)


# ----------------------------------------------------------------------------- rankings
def _removed_fractions(smap: StructureMap, keep) -> Tuple[float, float]:
    """(fraction of head parameters removed, fraction of neuron parameters removed)."""
    gone = {"heads": 0, "neurons": 0}
    total = {"heads": 0, "neurons": 0}
    for b in smap.blocks:
        for kind, g in b.groups():
            per = g.params_per_head if kind == "heads" else g.params_per_neuron
            total[kind] += g.size * per
            gone[kind] += (g.size - len(keep[b.index][kind])) * per
    return gone["heads"] / total["heads"], gone["neurons"] / total["neurons"]


@pytest.mark.parametrize("offset", [0.0, 0.15, 0.3])
def test_separate_ranking_splits_every_budget_between_the_kinds(offset) -> None:
    smap = synthetic_map([(8, 64, True)] * 4)
    # heads far more important than every neuron: the global ranking never touches a head
    hs, ns = constant_scores(smap, head=1e6, neuron=1.0)
    ns = {b: t + torch.rand(t.shape, generator=torch.Generator().manual_seed(b)) for b, t in ns.items()}
    assert _removed_fractions(smap, budget_masks(smap, hs, ns, sparsity=0.4))[0] == 0.0
    for s in (0.2, 0.4, 0.6):
        keep = budget_masks(smap, hs, ns, sparsity=s, ranking="separate", head_offset=offset)
        head_gone, neuron_gone = _removed_fractions(smap, keep)
        assert achieved(smap, keep)["sparsity"] >= s
        # heads trail neurons by the offset, up to one structure of either kind
        step = 1 / 8 + 1 / 64
        assert head_gone == pytest.approx(max(0.0, neuron_gone - offset), abs=step)


def test_separate_ranking_keeps_the_order_within_a_kind_and_nests(smap) -> None:
    hs, ns = random_scores(smap, 4)
    walks = nested_masks(smap, hs, ns, [0.1, 0.3, 0.5], ranking="separate")
    sets = [kept_set(k) for k in walks]
    assert sets[2] < sets[1] < sets[0]
    # within the neurons of one block the lower scores go first, as in the global ranking
    for keep in walks:
        for b, entry in keep.items():
            gone = set(range(len(ns[b]))) - set(entry["neurons"])
            if gone and entry["neurons"]:
                assert max(float(ns[b][i]) for i in gone) <= min(float(ns[b][i]) for i in entry["neurons"])
    # the ratio budget reads the same per-kind order under both rankings
    assert budget_masks(smap, hs, ns, mlp_ratio=0.3, head_ratio=0.2, ranking="separate") == \
        budget_masks(smap, hs, ns, mlp_ratio=0.3, head_ratio=0.2)


@pytest.mark.parametrize("kwargs, match", [
    ({"ranking": "sideways"}, "ranking='sideways' is not one of"),
    ({"ranking": "separate", "head_offset": 1.0}, "head_offset"),
    ({"ranking": "separate", "head_offset": -0.1}, "head_offset"),
])
def test_bad_ranking_options(smap, kwargs, match) -> None:
    hs, ns = random_scores(smap)
    with pytest.raises(BudgetError, match=match):
        budget_masks(smap, hs, ns, sparsity=0.3, **kwargs)


# ----------------------------------------------------------------------------- one API that cannot be misused
def test_budget_masks_takes_score_objects_and_refuses_raw_sums():
    """Issue 17: efx.budget_masks(smap, ls.head_scores, ls.neuron_scores) silently ranked raw sums.
    A LocalScores ranks by its per-parameter means, an ElasticScores by its searched ranking, and
    the raw sums are refused unless named with sums=True."""
    import elastic_fx as efx
    from elastic_fx.scoring.local import local_scores
    from zoo import build

    model, inputs = build("timm_vit")
    gm = efx.trace(model, inputs)
    smap = efx.discover(gm)
    ls = local_scores(gm, None, method="magnitude", structures=smap, progress=False)
    by_means = efx.budget_masks(smap, ls.head_means, ls.neuron_means, sparsity=0.4)
    assert efx.budget_masks(smap, ls, sparsity=0.4) == by_means
    assert efx.budget_masks(smap, ls, 0.4) == by_means
    es = efx.ElasticScores.from_local(ls, smap)
    assert efx.budget_masks(smap, es, sparsity=0.4) == es.keep(smap, 0.4) == by_means
    with pytest.raises(BudgetError, match="per-structure SUMS"):
        efx.budget_masks(smap, ls.head_scores, ls.neuron_scores, sparsity=0.4)
    with pytest.raises(BudgetError, match="per-structure SUMS"):
        efx.nested_masks(smap, ls.head_scores, ls.neuron_scores, [0.4])
    on_purpose = efx.budget_masks(smap, ls.head_scores, ls.neuron_scores, sparsity=0.4, sums=True)
    assert on_purpose != by_means  # sums rank otherwise: that is why they are refused by default
    with pytest.raises(BudgetError, match="not both"):
        efx.budget_masks(smap, ls, ls.neuron_means, sparsity=0.4)
    with pytest.raises(BudgetError, match="needs scores"):
        efx.budget_masks(smap, ls.head_means, sparsity=0.4)
