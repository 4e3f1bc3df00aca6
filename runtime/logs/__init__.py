"""The interaction log and its curation: typed records, the schema and its migrations,
the writer, retention, queries, export with redaction, clusters and stats.

Imports `outpost.manifests` (and `outpost.models` for nothing but types); never the
daemon core, escalation or the front door.
"""
