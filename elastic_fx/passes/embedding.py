"""embedding_module(gm, smap): the traced model cut at its pooled embedding.

Self-distillation (the DINO loss of the local scores), the fitness of the search and
k-NN evaluation all need the model's pooled representation ``[B, D]``, not its logits.
Discovery records which graph node holds it (``StructureMap.embedding``: the input of
the classifier of a timm model, the CLS select of a Hugging Face ``ViTModel`` ...).
This module returns a copy of the graph whose output is that node, with everything
after it (the classifier, a pooler) removed.

The copy shares every parameter and submodule with ``gm`` (no weights are copied), so
gradients of the embedding reach ``gm``'s parameters, and a sliced ``gm`` must be cut
again. It is a plain :class:`torch.fx.GraphModule` with the default code generation:
graphs from ``torch.export`` lose their pytree input/output wrapping and their
"eval()/train() not supported" restriction, and take the image batch positionally.

Takes ``gm`` and its StructureMap; returns the new GraphModule, whose meta is a copy of
``gm.meta`` plus ``EMBEDDING_META``. ``gm`` is not modified (when the embedding's rank is
unknown, a throwaway copy of the graph runs once on the example inputs). This module
imports only layer-1 modules, so the other passes may build on it.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.fx as fx

from ..errors import DiscoveryError
from ..structures import StructureMap
from ..tracing import EXAMPLE_INPUTS_META

log = logging.getLogger(__name__)

#: ``GraphModule.meta`` key recording which node of the source graph the output is.
EMBEDDING_META = "elastic_fx.embedding"


def embedding_module(gm: fx.GraphModule, smap: StructureMap) -> fx.GraphModule:
    """A GraphModule mapping images ``[B, 3, H, W]`` to pooled embeddings ``[B, D]``.

    Args:
        gm: the GraphModule returned by :func:`elastic_fx.trace`.
        smap: its :class:`StructureMap` (from :func:`elastic_fx.discover`); its
            ``embedding`` names the node to return. A ``[B, N, D]`` token tensor is
            reduced to token 0 (the class token).

    Returns:
        A new GraphModule sharing ``gm``'s parameters, whose graph ends at the
        embedding (dead code removed) and whose ``meta`` is a copy of ``gm.meta``.

    Raises:
        DiscoveryError: ``smap`` names no embedding, or a node ``gm`` does not have, or
            the node's value is not ``[B, D]`` / ``[B, N, D]``.
    """
    if not isinstance(gm, fx.GraphModule):
        raise DiscoveryError(
            f"embedding_module() takes the GraphModule returned by efx.trace(model), got {type(gm).__name__}"
        )
    if not smap.embedding:
        raise DiscoveryError(
            "discovery found no pooled embedding in this model (no classifier input and no [batch, dim] "
            "output); pass a loss_fn that computes the loss from the model output yourself, or trace the "
            "model without its head so that it returns [batch, dim] embeddings"
        )
    nodes = {n.name: n for n in gm.graph.nodes}
    target = nodes.get(smap.embedding)
    if target is None:
        raise DiscoveryError(
            f"the structure map names node {smap.embedding!r} as the embedding, but this graph has no such "
            "node; run efx.discover(gm) on this very GraphModule"
        )

    graph = fx.Graph()
    val_map = {}
    graph.graph_copy(gm.graph, val_map)  # copies every node but the output
    out = val_map[target]
    rank = _rank_from_meta(target)
    if rank is None:
        rank = _probe_rank(gm, graph, out)
    if rank == 3:
        out = graph.call_function(torch.select, (out, 1, 0))  # [B, N, D] -> class token [B, D]
    elif rank != 2:
        raise DiscoveryError(
            f"the embedding node {smap.embedding!r} has {rank} dimensions; expected [batch, dim] or "
            "[batch, tokens, dim]"
        )
    graph.output(out)
    emb = fx.GraphModule(gm, graph, f"{type(gm).__name__}Embedding")
    emb.graph.eliminate_dead_code()  # the purity check of call_module nodes needs the owning module
    emb.graph.lint()
    emb.delete_all_unused_submodules()  # only references: gm keeps its own
    emb.recompile()
    emb.meta.update(gm.meta)
    emb.meta[EMBEDDING_META] = smap.embedding
    log.debug("embedding module ends at node %s (rank %d)", smap.embedding, rank)
    return emb


def _rank_from_meta(node: fx.Node) -> Optional[int]:
    """Rank recorded by torch.export (``val``) or ShapeProp (``tensor_meta``), if any."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dim()
    tm = node.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    return len(shape) if shape is not None else None


def _probe_rank(gm: fx.GraphModule, graph: fx.Graph, out: fx.Node) -> int:
    """Run a throwaway copy ending at ``out`` on the example inputs and read the rank."""
    probe_graph = fx.Graph()
    vm = {}
    probe_graph.graph_copy(graph, vm)
    probe_graph.output(vm[out])
    probe = fx.GraphModule(gm, probe_graph)
    example = gm.meta.get(EXAMPLE_INPUTS_META)
    if example is None:
        raise DiscoveryError(
            "cannot tell the shape of the embedding node: this GraphModule carries no example inputs; "
            "create it with efx.trace(model, example_inputs)"
        )
    param = next(gm.parameters(), None)
    if param is not None:  # the model may have moved since it was traced
        example = tuple(x.to(param.device) if isinstance(x, torch.Tensor) else x for x in example)
    with torch.no_grad():
        value = probe(*example)
    if not isinstance(value, torch.Tensor):
        raise DiscoveryError(f"the embedding node computes a {type(value).__name__}, not a tensor")
    return value.dim()
