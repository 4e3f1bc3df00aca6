"""The catalog: every manifest this device knows, and how a request finds one.

Manifests come from three places, later ones overriding earlier ones by id:
the default catalog shipped in this package, `*.toml` files in the configured
manifest folders, and the manifests recorded in the store by earlier pulls (so a
pulled model stays usable even if its source manifest moves on).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import UnknownModel
from .schema import Manifest
from .store import ModelStore


@dataclass(frozen=True)
class Entry:
    manifest: Manifest
    text: str  # the TOML it was read from, recorded verbatim on pull
    origin: str


class Catalog:
    def __init__(self, entries: dict[str, Entry], default: str) -> None:
        self._entries = entries
        self.default = default

    @classmethod
    def load(cls, store: ModelStore, extra_dirs: list[Path], default: str) -> Catalog:
        entries: dict[str, Entry] = {}
        for item in sorted(resources.files(__package__).joinpath("catalog").iterdir(),
                           key=lambda p: p.name):
            if item.name.endswith(".toml"):
                text = item.read_text(encoding="utf-8")
                entries_add(entries, text, f"catalog:{item.name}")
        for folder in [*extra_dirs, store.manifests]:
            if folder.is_dir():
                for path in sorted(folder.glob("*.toml")):
                    entries_add(entries, path.read_text(encoding="utf-8"), str(path))
        return cls(entries, default)

    def ids(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, model_id: str) -> Entry:
        try:
            return self._entries[model_id]
        except KeyError:
            raise UnknownModel(model_id, self.ids()) from None

    def get(self, model_id: str) -> Manifest:
        return self.entry(model_id).manifest

    def for_task(self, task: str) -> Manifest | None:
        """The task adapter promoted for `task` (one on the default model first), else the
        default model if it serves `task`, else the first model that does (by id)."""
        adapters = [m for m in self if m.adapter is not None and task in m.tasks]
        if adapters:
            return min(adapters, key=lambda m: m.adapter.base != self.default)
        if task in self.get_default().tasks:
            return self.get_default()
        for model_id in self.ids():
            if task in self._entries[model_id].manifest.tasks:
                return self._entries[model_id].manifest
        return None

    def put(self, text: str, origin: str) -> Manifest:
        """Serve another version of a model from now on (an activation or a rollback):
        requests routed after this see it; one already routed keeps what it had."""
        manifest = Manifest.from_toml(text, origin)
        self._entries[manifest.id] = Entry(manifest, text, origin)
        return manifest

    def remove(self, model_id: str) -> None:
        """Stop serving a model (a task adapter rolled back to its base)."""
        self._entries.pop(model_id, None)

    def active(self, manifest: Manifest) -> Manifest:
        """The version of `manifest`'s model served now (itself, unless another was put)."""
        entry = self._entries.get(manifest.id)
        if entry is None or entry.manifest.version == manifest.version:
            return manifest
        return entry.manifest

    def get_default(self) -> Manifest:
        return self.get(self.default)

    def __iter__(self):
        return (self._entries[i].manifest for i in self.ids())


def entries_add(entries: dict[str, Entry], text: str, origin: str) -> None:
    manifest = Manifest.from_toml(text, origin)
    entries[manifest.id] = Entry(manifest, text, origin)


def model_row(m: Manifest, store: ModelStore, catalog: Catalog) -> dict:
    """One model as `models list` and the `models.list` method show it."""
    return {"id": m.id, "version": m.version, "description": m.description, "tasks": m.tasks,
            "backend": m.backend, "size_bytes": sum(f.size for f in m.files),
            "memory_estimate_bytes": int(m.memory_estimate), "context_length": m.context_length,
            "pulled": store.is_pulled(m), "default": m.id == catalog.default,
            "adapter_of": f"{m.adapter.base} {m.adapter.base_version}" if m.adapter else None}
