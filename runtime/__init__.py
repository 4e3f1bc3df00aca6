"""The daemon: config, the ZeroMQ broker and its model workers, the pool, the log, the CLI.

Imports `outpost.models` and `outpost.manifests`, never `outpost.sync` or `outpost.tools`.
"""

VERSION = "0.1.0"
