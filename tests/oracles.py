"""Test oracles shared by several test files (plain PyTorch, deliberately slow and obvious)."""

import torch


def per_structure_sum(smap, values):
    """Σ of values[name] over each structure's entries, one structure at a time (index_select).

    ``values`` maps parameter names to tensors of the parameters' shapes (e.g. w², g², |w·g|);
    buffers are skipped. Returns (head sums, neuron sums) per block, float32.
    """
    heads, neurons = {}, {}
    for b in smap.blocks:
        for kind, group in b.groups():
            out = torch.zeros(group.size, dtype=torch.float64)
            for sl in group.slices:
                if sl.buffer:
                    continue
                v = values[sl.name].double()
                for s in range(group.size):
                    out[s] += v.index_select(sl.dim, sl.index[s]).sum()
            (heads if kind == "heads" else neurons)[b.index] = out.float()
    return heads, neurons


def zero_structures(module, smap, keep):
    """In place: zero the out-projection columns of every head / neuron ``keep`` removes.

    The dense model with these zeros computes exactly what the sliced model computes: the
    reference of the slicing invariant (and of weight correction). Returns ``module``.
    """
    from elastic_fx.keep import normalize_keep

    full = normalize_keep(smap, keep)
    with torch.no_grad():
        for b in smap.blocks:
            for kind, g in b.groups():
                removed = sorted(set(range(g.size)) - set(full[b.index][kind]))
                if not removed:
                    continue
                out_w = g.out_slice()
                cols = out_w.index[torch.as_tensor(removed)].reshape(-1)
                module.get_parameter(out_w.name)[:, cols] = 0
    return module
