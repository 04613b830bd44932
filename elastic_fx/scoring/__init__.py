"""elastic_fx.scoring."""
