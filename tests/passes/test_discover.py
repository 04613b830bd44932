"""Discovery on every model of the zoo: exact blocks, heads, head_dim, hidden sizes."""

import pytest
import torch

import elastic_fx as efx
from zoo import ZOO, build, output_tensors, params


@pytest.mark.parametrize("name", params())
def test_trace_reproduces_eager_outputs(name, traced):
    model, inputs, gm, _ = traced(name)
    assert gm.meta["elastic_fx.tracer"] == ZOO[name].tracer
    fresh = torch.randn_like(inputs[0])
    with torch.no_grad():
        want, got = output_tensors(model(fresh)), output_tensors(gm(fresh))
    assert len(want) == len(got)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# Where discovery deliberately differs from the modules' ground truth (ZooEntry.left_out): Hugging
# Face's SigLIP pooling head is an nn.MultiheadAttention that torch.export decomposes into bmm over
# (batch * heads) with weights split out of one packed parameter; talking-heads (CaiT) and
# re-attention (DeepViT) mix heads. elastic_fx leaves those attentions out, says why in the block,
# and still prunes their FFNs.


@pytest.mark.parametrize("name", params())
def test_discover_finds_exact_structure(name, traced):
    entry = ZOO[name]
    _, _, _, smap = traced(name)
    skip = set(entry.left_out)
    assert [b.index for b in smap.blocks if b.attention_reason] == sorted(skip)
    for i in skip:
        assert smap.blocks[i].attention_reason in smap.summary()
    heads = [None if i in skip else h for i, h in enumerate(entry.heads)]
    head_dim = [None if i in skip else h for i, h in enumerate(entry.head_dim)]
    assert len(smap.blocks) == entry.blocks
    assert [b.index for b in smap.blocks] == list(range(entry.blocks))
    assert [b.attention.num_heads if b.attention else None for b in smap.blocks] == heads
    assert [b.attention.head_dim if b.attention else None for b in smap.blocks] == head_dim
    assert [b.mlp.hidden_features if b.mlp else None for b in smap.blocks] == entry.hidden
    assert [b.mlp.prunable if b.mlp else None for b in smap.blocks] == entry.mlp_prunable


@pytest.mark.parametrize("name", params())
def test_structure_names_point_at_real_layers(name, traced):
    """out_proj names are qualified names of the ORIGINAL model whose input columns are the structures."""
    model, _, gm, smap = traced(name)
    params_of = dict(model.named_parameters())
    params_of.update(dict(model.named_buffers()))
    for b in smap.blocks:
        for g in (b.attention, b.mlp):
            if g is None:
                continue
            for s in g.slices:
                if s.name not in params_of:  # a constant torch.export lifted out of the model (a cache)
                    assert s.buffer and gm.meta["elastic_fx.tracer"] == "export", s.name
                    owner, _, attr = s.name.rpartition(".")
                    assert tuple(getattr(gm.get_submodule(owner), attr).shape) == s.shape
                    continue
                assert tuple(params_of[s.name].shape) == s.shape
                # every structure owns distinct positions
                flat = s.index.reshape(-1)
                assert flat.unique().numel() == flat.numel()
        if b.attention is not None:
            w = dict(model.named_parameters()).get(f"{b.attention.out_proj}.weight")
            if w is None:  # nn.MultiheadAttention keeps out_proj as a submodule too
                w = model.get_submodule(b.attention.out_proj).weight
            assert w.shape[1] == b.attention.num_heads * b.attention.head_dim
        if b.mlp is not None:
            w = model.get_submodule(b.mlp.out_proj).weight
            assert w.shape[1] == b.mlp.hidden_features


@pytest.mark.parametrize("name", params())
def test_parameter_counts_add_up(name, traced):
    model, _, _, smap = traced(name)
    assert smap.total_params == sum(p.numel() for p in model.parameters())
    per_structure = sum(
        (b.attention.num_heads * b.attention.params_per_head if b.attention else 0)
        + (b.mlp.hidden_features * b.mlp.params_per_neuron if b.mlp and b.mlp.prunable else 0)
        for b in smap.blocks
    )
    assert smap.prunable_params == per_structure
    assert 0 < smap.prunable_params < smap.total_params


def test_vit_b16_flops_match_paper_table8():
    """Paper Table 8: ViT-B/16 at 224 px is about 35.1 GFLOPs (embedding and head counted)."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_base_patch16_224", pretrained=False, depth=1).eval()
    gm = efx.trace(model, (torch.randn(2, 3, 224, 224),))
    smap = efx.discover(gm)
    block = smap.blocks[0]
    # one block's heads and neurons, per image: Table 7 with n=197, d=768, d_key=64, 12 heads
    n, d = 197, 768
    attn = 2 * n * 3 * d * d + 2 * n * n * d + 3 * 12 * n * n + 2 * n * n * d + 2 * n * d * d
    assert block.attention.num_heads * block.attention.flops_per_head == attn
    assert block.mlp.hidden_features * block.mlp.flops_per_neuron == 16 * n * d * d
    embed, logits = 2 * 196 * 16 * 16 * 3 * d, 2 * d * 1000
    assert smap.fixed_flops == embed + logits
    twelve = embed + logits + 12 * (attn + 16 * n * d * d)
    assert abs(twelve / 1e9 - 35.1) < 0.05


@pytest.mark.parametrize("bad", ["resnet_like", "mlp_only"])
def test_not_a_vit_is_a_clear_error(bad):
    model, inputs = build(bad)
    gm = efx.trace(model, inputs)
    with pytest.raises(efx.DiscoveryError, match="no attention heads or FFN neurons found"):
        efx.discover(gm)


def test_data_dependent_control_flow_is_a_tracing_error():
    model, inputs = build("data_dependent")
    with pytest.raises(efx.TracingError) as err:
        efx.trace(model, inputs)
    msg = str(err.value)
    assert "torch.fx" in msg and "torch.export" in msg and "register_leaf_module" in msg
    assert isinstance(err.value, efx.ElasticFxError)


def test_discover_needs_a_graph_module():
    with pytest.raises(efx.DiscoveryError, match="efx.trace"):
        efx.discover(torch.nn.Linear(2, 2))


def test_summary_is_a_readable_table(traced):
    _, _, _, smap = traced("timm_vit")
    text = smap.summary()
    assert "block" in text.splitlines()[0] and "GFLOPs" in text
    assert len([line for line in text.splitlines() if line.strip().startswith(("0 ", "1 "))]) == 2


def test_leaf_module_registry_keeps_a_module_opaque():
    model, inputs = build("timm_vit")
    mlp_cls = type(model.blocks[0].mlp)
    efx.register_leaf_module(mlp_cls)
    try:
        gm = efx.trace(model, inputs)
        targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        assert "blocks.0.mlp" in targets
        smap = efx.discover(gm)
        assert all(b.mlp is None for b in smap.blocks)  # opaque FFN: its neurons are not pruned
        assert [b.attention.num_heads for b in smap.blocks] == ZOO["timm_vit"].heads
    finally:
        from elastic_fx import tracing

        tracing._LEAF_MODULES.discard(mlp_cls)


def test_discover_writes_its_map_into_meta_and_the_getter_reads_it(traced):
    from elastic_fx.structures import STRUCTURE_META, structures_of

    _, inputs, gm, smap = traced("timm_vit")
    assert gm.meta[STRUCTURE_META] is smap and structures_of(gm) is smap
    small = efx.slice(gm, smap, {0: {"heads": [0]}})
    with pytest.raises(efx.DiscoveryError, match=r"run efx.discover\(gm\) first"):
        structures_of(small)  # slicing drops the stale map
    again = efx.discover(small)
    assert structures_of(small) is again and again.blocks[0].attention.num_heads == 1


@pytest.mark.parametrize("name", ["timm_vit", "hf_vit", "torchvision_vit", "timm_eva02"])
def test_out_columns_are_the_out_projection_input_columns(name, traced):
    """out_slice()/out_columns(): the one lookup of the columns each head / neuron owns."""
    model, _, _, smap = traced(name)
    for b in smap.blocks:
        for _, g in b.groups():
            sl = g.out_slice()
            assert sl.name == f"{g.out_proj}.weight" and sl.dim == 1
            cols = g.out_columns()
            assert cols.shape[0] == g.size and torch.equal(cols, sl.index)
            width = model.get_submodule(g.out_proj).weight.shape[1]
            assert sorted(cols.reshape(-1).tolist()) == list(range(width))  # every column owned once
