"""One folder as the rules see it: read lazily, each part once, every byte through the
validating layers (checkpoint/ for files, the schema for config.json).

A part a rule needs but the folder lacks (or cannot give: an unreadable shard, a malformed
config) raises NotApplicable in that rule; the rule that owns the defect reports it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

from ...checkpoint.paths import inside
from ...checkpoint.problems import CheckpointError
from ...checkpoint.reader import (CheckpointFolder, consistency_problems, open_folder, read_file,
                                  read_json)
from ..config import CONFIG, config_problems, is_hf_layout, lm_fields, read_config, tower_problems
from ..errors import ContractError
from ..keys import LAYOUT_MAPS, KeyMapError, layout_of
from ..kinds import PROJECTOR_FILES, Detected, detect_kind, has_file, has_weights
from ..tensors import canonical_shapes, logical_shapes_of
from .model import NotApplicable
from .values import ValueStats, scan_values


class Context:
    """A folder under check (and, with `--base`, its base)."""

    def __init__(self, path: Path, base: Context | None = None):
        self.path = Path(path)
        self.base = base
        self._values = None  # a Future of the values pass, once prefetched

    def file(self, name: str) -> str:
        return str(self.path / name)

    def has(self, name: str) -> bool:
        try:
            return has_file(self.path, name)
        except CheckpointError:
            return True  # a link out of the folder is there, and refused where it is read

    # --- what the folder is --------------------------------------------------------------

    @cached_property
    def detected(self) -> Detected:
        """The kind, told from the files even when config.json is malformed (the schema rule
        reports that); a folder that is no model folder at all raises (exit 2)."""
        try:
            return detect_kind(self.path, check_config=False)
        except (CheckpointError, ContractError):
            if self.path.is_dir() and has_weights(self.path):
                return Detected("llava", "model weights, and no readable config.json to say "
                                         "more; checked as a full LLaVA folder")
            raise

    @property
    def kind(self) -> str:
        return self.detected.kind

    # --- config.json -----------------------------------------------------------------------

    @cached_property
    def raw_config(self) -> dict | None:
        """config.json as parsed (not yet held to the schema); None when absent."""
        if not self.has(CONFIG):
            return None
        return read_config(self.path, check=False)

    @cached_property
    def config_problems(self) -> list[str]:
        return [] if self.raw_config is None else config_problems(self.raw_config,
                                                                  self.file(CONFIG))

    @property
    def config(self) -> dict:
        """config.json when well formed; NotApplicable otherwise (`config-field` says why)."""
        try:
            data = self.raw_config
        except CheckpointError as exc:
            raise NotApplicable(f"config.json is unreadable ({exc})") from None
        if data is None:
            raise NotApplicable("the folder has no config.json")
        if self.config_problems:
            raise NotApplicable("config.json has malformed fields (config-field)")
        return data

    @property
    def lm(self) -> dict:
        return lm_fields(self.config)

    # --- tensors ------------------------------------------------------------------------------

    @cached_property
    def weights(self) -> CheckpointFolder:
        if not has_weights(self.path):
            raise NotApplicable("the folder holds no model weights")
        try:
            return open_folder(self.path)
        except CheckpointError as exc:
            raise NotApplicable(f"the weights are unreadable ({exc})") from None

    @cached_property
    def weight_problems(self) -> list[str]:
        """Every way the shards and their index are unreadable or disagree."""
        if not has_weights(self.path):
            return []  # weights-missing says so
        try:
            folder = open_folder(self.path)
        except CheckpointError as exc:
            return [str(exc)]
        return consistency_problems(folder)

    @cached_property
    def sources(self) -> dict:
        """Every stored tensor (validated headers), when the weights read cleanly."""
        folder = self.weights
        if self.weight_problems:
            raise NotApplicable("the weights are unreadable or inconsistent (weights-unreadable)")
        return folder.tensors

    @cached_property
    def layout(self) -> str:
        return "hf" if is_hf_layout(self.config) else "original"

    @cached_property
    def logical(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's logical shape (a quantized linear as its float weight), under its
        stored name."""
        try:
            return logical_shapes_of(self.sources, self.config, self.path)
        except (CheckpointError, ContractError) as exc:
            raise NotApplicable(f"the tensors cannot be read as a model ({exc})") from None

    @cached_property
    def canonical(self) -> dict[str, tuple[int, ...]]:
        """The logical shapes under their original-layout names (names the layout's map does
        not cover are left out: `unknown-tensors` names them)."""
        try:
            layout_of(self.config, self.sources)
            return canonical_shapes(self.logical, self.config)
        except KeyMapError as exc:
            raise NotApplicable(f"the tensors cannot be read as a model ({exc})") from None

    @cached_property
    def values(self) -> dict[str, ValueStats]:
        """One streaming pass over every tensor's values (begun early by `prefetch_values`)."""
        if self._values is not None:
            return self._values.result()
        return scan_values(self.sources)

    def prefetch_values(self) -> None:
        """Start the values pass in a thread now: it is bound by the disk, and the other rules
        (transformers' import and the tokenizer, above all) then run while it reads."""
        try:
            sources = self.sources
        except NotApplicable:
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix="llava-values")
        self._values = pool.submit(scan_values, sources)
        pool.shutdown(wait=False)

    # --- side files ---------------------------------------------------------------------------

    def json_file(self, name: str) -> dict:
        """A small JSON side file; NotApplicable when absent, a finding-worthy CheckpointError
        when unreadable (raised for the rule to report)."""
        if not self.has(name):
            raise NotApplicable(f"the folder has no {name}")

        return read_json(inside(self.path, name), self.path / name)

    def tensor_file(self, name: str) -> dict:
        if not self.has(name):
            raise NotApplicable(f"the folder has no {name}")

        return read_file(inside(self.path, name))

    @cached_property
    def projector_file(self) -> str | None:
        return next((n for n in PROJECTOR_FILES if self.has(n)), None)

    # --- the vision tower ---------------------------------------------------------------------

    @cached_property
    def tower_path(self) -> Path | None:
        """The local folder `mm_vision_tower` names, when it is one."""
        named = self.config.get("mm_vision_tower")
        if not isinstance(named, str):
            return None
        path = Path(named) if Path(named).is_absolute() else self.path / named
        return path if (path / CONFIG).is_file() else None

    @cached_property
    def tower_config(self) -> dict:
        """The local tower's config (a llava-hf folder's vision_config); NotApplicable when
        the tower is not local."""
        if self.layout == "hf":
            return self.config.get("vision_config") or {}
        if self.tower_path is None:
            raise NotApplicable("mm_vision_tower is not a local folder (the harness never "
                                "downloads a tower)")
        data = read_json(self.tower_path / CONFIG)
        if tower_problems(data, str(self.tower_path / CONFIG)):
            raise NotApplicable("the tower's config.json is malformed (tower-config)")
        return data.get("vision_config", data) if isinstance(data.get("vision_config"),
                                                              dict) else data


__all__ = ["Context", "LAYOUT_MAPS"]
