"""The daemon core: the ZeroMQ server and its wire protocol, the pool of model workers
under one memory budget, and the worker processes themselves.

Imports `outpost.runtime.escalation`, `outpost.runtime.logs`, `outpost.models` and
`outpost.manifests`; never the front door (`outpost.runtime.cli`, `client`, `config`).
"""
