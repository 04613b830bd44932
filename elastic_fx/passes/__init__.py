"""elastic_fx.passes."""
