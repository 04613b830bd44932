"""elastic_fx.exporters."""
