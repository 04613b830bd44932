"""elastic_fx.search."""
