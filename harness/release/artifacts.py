"""One artifact of a release as the relations read it: its kind (the contract's), its config,
and its tensors under their original-layout names, each read on demand through a mapping of its
own (memory stays one tensor, whatever the artifact's size)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..checkpoint.reader import as_tensor, open_folder, scan_file
from ..llava.config import is_hf_layout, read_config
from ..llava.keys import LAYOUT_MAPS, TOWER_FOLDER, canonical_tower_key
from ..llava.kinds import PROJECTOR_FILES, detect_kind
from ..errors import HarnessError
from .manifest import ManifestError


@dataclass
class Artifact:
    name: str
    path: Path

    @cached_property
    def is_file(self) -> bool:
        return self.path.is_file()

    @cached_property
    def kind(self) -> str:
        if self.is_file:
            return "projector"
        return detect_kind(self.path).kind

    @cached_property
    def config(self) -> dict:
        return read_config(self.path)

    @cached_property
    def folder(self):
        folder = open_folder(self.path)
        folder.check()
        return folder

    @cached_property
    def sources(self) -> dict:
        """Canonical (original-layout) name -> stored source."""
        if self.is_file or self.kind == "projector":
            return self._projector_file_sources()
        layout = LAYOUT_MAPS["hf" if is_hf_layout(self.config) else "original"]
        out, unmapped = {}, []
        for key, source in self.folder.tensors.items():
            name = canonical_tower_key(layout(key)) if layout.covers(key) else None
            if name is None:
                unmapped.append(key)
            else:
                out[name] = source
        self.unmapped = unmapped
        return out

    def _projector_file_sources(self) -> dict:
        path = self.path if self.is_file else next(
            self.path / n for n in PROJECTOR_FILES if (self.path / n).is_file())
        fmt = "safetensors" if path.suffix == ".safetensors" else "bin"
        sources, _ = scan_file(path, fmt)
        self.unmapped = []
        return {k if k.startswith("model.") else f"model.{k}": s for k, s in sources.items()}

    @cached_property
    def stored_names(self) -> dict[str, str]:
        """Canonical name -> the name it is stored under."""
        self.sources
        return {name: source.key for name, source in self.sources.items()}

    def tensor(self, name: str):
        return as_tensor(self.sources[name], {})

    @cached_property
    def tower_path(self) -> Path | None:
        """The local folder `mm_vision_tower` names: absolute, beside the artifact, or (as
        LLaVA's loader reads it) from the working folder; None for a hub id."""
        named = self.config.get("mm_vision_tower")
        if not isinstance(named, str):
            return None
        for path in (self.path / named, Path(named)):
            if (path / "config.json").is_file():
                return path
        return None

    @cached_property
    def tower(self) -> dict:
        """The vision tower `mm_vision_tower` names, when it is a local folder: canonical name
        -> source (a llava-hf folder holds its tower; an original one names it)."""
        if self.tower_path is None:
            return {}
        folder = open_folder(self.tower_path)
        return {TOWER_FOLDER(k): s for k, s in folder.tensors.items()
                if TOWER_FOLDER.covers(k) and TOWER_FOLDER(k) is not None}

    def bytes(self) -> int:
        """The artifact's bytes on disk (what its relations read at most)."""
        if self.is_file:
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


def artifacts_of(manifest) -> dict[str, Artifact]:
    out = {}
    for name, path in manifest.artifacts.items():
        artifact = Artifact(name, path)
        try:
            artifact.kind
        except HarnessError as exc:  # the contract refuses it: one line
            raise ManifestError(f"{manifest.path}: artifact {name} ({path}): {exc}") from None
        out[name] = artifact
    return out
