"""Field devices: pulling signed manifests and model files, pushing logs to the fleet.

pull.py pulls a channel's models from a TUF-signed hub (a folder so far; S3 and HTTPS
mirrors, resumable transfers, activation and the log push come next: docs/fleet.md).
Needs the `fleet` extra. May import `outpost.runtime` and below, never `outpost.tools`."""
