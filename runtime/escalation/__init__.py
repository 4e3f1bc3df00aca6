"""Escalation: which policy a request runs under, how much to trust a local answer,
the cloud LLM client, and the flow that decides who answers.

Imports `outpost.runtime.logs` (the attempt records it produces), `outpost.models` and
`outpost.manifests`; never the daemon core or the front door.
"""
