"""Field devices: pulling signed manifests and model files, pushing logs to the fleet.

Empty in this release; the model store's sources (`outpost.manifests.sources`) already
pull single models. May import `outpost.runtime` and below, never `outpost.tools`."""
