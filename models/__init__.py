"""Running a model: backends (llama.cpp for GGUF), chat templates, and xgrammar-constrained
decoding of tool calls. Imports `outpost.manifests` only; never `outpost.runtime`."""
