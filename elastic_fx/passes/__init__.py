"""elastic_fx.passes: passes over a traced GraphModule.

Public passes (each imports only the shared pieces below and layer-1 modules, never
another public pass; ``mask`` builds on the ``embedding`` cut):

* ``discover``: GraphModule -> StructureMap (written into ``gm.meta``);
* ``slice``: GraphModule + StructureMap + keep-mask -> a smaller GraphModule (``SliceResult``);
* ``mask``: GraphModule + StructureMap -> ``MaskedModel`` scoring many keep-masks per forward;
* ``correct``: weight correction of the out-projections a keep-mask prunes (``CorrectionResult``);
* ``embedding``: GraphModule + StructureMap -> the graph cut at the pooled embedding.

Shared pieces, bottom first: ``_mha`` (nn.MultiheadAttention written out once),
``_labels`` (op classes, provenance labels), ``_attention`` (attention cores, found one
way), ``_masked_modules`` (the modules the masked graph calls).
"""
