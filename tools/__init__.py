"""Offline work beside the daemon: benchmarks, test fixtures such as tiny GGUF models,
and later BFCL evaluation, dataset export and task clustering. Top of the import order."""
