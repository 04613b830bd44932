"""Passes on a model that does not live on the CPU, checked on a CPU with the 'meta' device.

A meta tensor has a device other than the CPU but no values: every op that mixes it with a
CPU tensor, or reads it, shows up here as it would on a GPU (where a mixed-device op raises
and a read is a host sync), without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

import elastic_fx as efx
from elastic_fx.errors import DiscoveryError
from elastic_fx.keep import keeps_to_masks
from elastic_fx.passes.mask import build_masked, masks_to
from elastic_fx.tracing import EXAMPLE_INPUTS_META
from zoo import build


def _on_meta(gm):
    """``gm`` (traced on the CPU) moved to the meta device, example inputs included."""
    gm.to("meta")
    gm.meta[EXAMPLE_INPUTS_META] = tuple(t.to("meta") if isinstance(t, torch.Tensor) else t
                                         for t in gm.meta[EXAMPLE_INPUTS_META])
    return gm


class _CrossDevice(TorchDispatchMode):
    """Records every op whose tensors (inputs and outputs) span more than one device."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        devices = {t.device for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)}
        if len(devices) > 1:
            self.ops.append(str(func))
        return out


def test_discovery_of_a_model_off_the_cpu_equals_the_cpu_one():
    model, inputs = build("timm_vit")
    gm = efx.trace(model, inputs)
    want = efx.discover(gm).summary()
    assert efx.discover(_on_meta(gm)).summary() == want


def test_index_ops_off_the_cpu_are_followed_or_refused_never_silently_dropped():
    """BEiT indexes its relative-position table with an integer buffer. Labels live on the
    CPU; before the fix that buffer, on another device, made the replay fail and discovery
    silently lost the heads of a block. On a GPU it is brought to the CPU; on meta it has no
    values, so discovery must say so."""
    model, inputs = build("timm_beit")
    gm = efx.trace(model, inputs)
    efx.discover(gm)  # fine on the CPU
    with pytest.raises(DiscoveryError, match="meta"):
        efx.discover(_on_meta(gm))


def test_slicing_a_model_off_the_cpu_gives_the_cpu_shapes():
    model, inputs = build("timm_vit")
    gm = efx.trace(model, inputs)
    smap = efx.discover(gm)
    keep = {0: {"heads": [0], "neurons": [1, 2, 3]}}
    want = {k: tuple(v.shape) for k, v in efx.slice(gm, smap, keep).state_dict().items()}
    small = efx.slice(_on_meta(gm), smap, keep)
    assert {k: tuple(v.shape) for k, v in small.state_dict().items()} == want
    assert all(p.device.type == "meta" for p in small.parameters())


def test_masks_reach_the_device_in_one_copy():
    """A blocking host-to-device copy stalls a GPU: one per block per forward was the old cost."""
    masks = {i: torch.rand(3, 5) > 0.5 for i in range(12)}
    with _CrossDevice() as seen:
        (moved,) = masks_to("meta", masks)
    assert len(seen.ops) == 1
    assert set(moved) == set(masks) and all(moved[i].device.type == "meta" for i in masks)
    assert all(moved[i].shape == masks[i].shape and moved[i].dtype == torch.bool for i in masks)
    (same,) = masks_to("cpu", masks)
    assert all(same[i] is masks[i] for i in masks)  # already there: no copy at all


def _four_block_vit(device: str = "meta"):
    """A 4-block timm ViT's StructureMap and its masked model on ``device``."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, mlp_ratio=2,
                              num_classes=10).eval()
    gm = efx.trace(model, (torch.randn(2, 3, 32, 32),))
    smap = efx.discover(gm)
    return smap, build_masked(gm, smap).to(device)


def test_masked_forward_off_the_cpu_crosses_devices_once():
    """The whole masked forward of a 4-block ViT with host masks: two transfers (the masks, and
    the kept positions of every gathered projection), then device-only ops."""
    smap, masked = _four_block_vit()
    heads, neurons = keeps_to_masks(smap, [{0: {"heads": [0]}}, {1: {"neurons": [1, 2]}}, None])
    with _CrossDevice() as seen, torch.no_grad():
        out = masked(torch.randn(2, 3, 32, 32, device="meta"), heads, neurons)
    assert out.shape == (3, 2, 48) and out.device.type == "meta"
    assert seen.ops == ["aten._to_copy.default"] * 2


def test_masked_embeddings_off_the_cpu_never_read_masks_back():
    """masked_embeddings on a device: per image batch one copy of the images, per forward one
    of the masks and one of the kept positions (read from the host masks, never back from the
    device: a read-back is a sync, on meta an error), whatever the number of blocks."""
    from elastic_fx.search.evaluate import masked_embeddings

    smap, masked = _four_block_vit()
    keeps = [{0: {"heads": [0]}}, {1: {"neurons": [1, 2]}}, {}, {3: {"heads": [2, 1]}}]
    with _CrossDevice() as seen:
        out = masked_embeddings(masked, torch.randn(4, 3, 32, 32), keeps, batch_size=2, pair_chunk=2,
                                device="meta", dtype=torch.float32)
    assert out.shape == (4, 4, 48) and out.device.type == "meta" and out.dtype == torch.float32
    batches, forwards = 2, 4
    assert len(seen.ops) == batches + 2 * forwards  # copies ("aten.to.*" under inference mode), nothing else
    assert all(op.startswith(("aten.to.", "aten._to_copy.")) for op in seen.ops), seen.ops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: masks on the device are read back")
def test_masks_given_on_the_device_are_read_back_once_per_forward():
    """Masks passed on the device (not what the search does) cost one read-back per forward,
    not one per gathered projection."""
    smap, masked = _four_block_vit("cuda")
    heads, neurons = masks_to("cuda", *keeps_to_masks(smap, [{0: {"heads": [0]}}, {1: {"neurons": [1, 2]}}]))
    with _CrossDevice() as seen, torch.no_grad():
        masked(torch.randn(2, 3, 32, 32, device="cuda"), heads, neurons)
    assert len(seen.ops) == 2  # the masks back to the host, the kept positions to the device
