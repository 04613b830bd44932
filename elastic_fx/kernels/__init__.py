"""elastic_fx.kernels."""
