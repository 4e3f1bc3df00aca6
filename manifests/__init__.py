"""What a model is: manifests, the default catalog, the content-addressed store, and the
one error tree every layer raises from. The lowest layer: imports nothing of Outpost."""
