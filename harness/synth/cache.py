"""Real-size checkpoints built once into a cache folder and reused across runs.

Each build lives in `<cache>/<name>-<format>-<hash>/`, the hash taken over the whole spec and
the fill version, so any change of knob or fill gives a new folder. A sidecar manifest beside
the folder (never inside it, so the folder stays exactly like a published checkpoint) records
the files and their sizes; reuse is allowed after that cheap check only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

from filelock import FileLock

from ..data import CACHE_ENV_VAR, cache_root
from ..errors import HarnessError
from .plan import make_plan
from .specs import BuildSpec

__all__ = ["CacheError", "ENV_VAR", "cache_lock", "cache_path", "cache_root", "cached_build",
           "ensure_space", "is_valid", "remove", "spec_hash"]

# Bump when fill.py changes the bytes a (seed, key) produces.
FILL_VERSION = 1
ENV_VAR = CACHE_ENV_VAR


class CacheError(HarnessError, RuntimeError):
    pass


# CheckpointSpec fields added after builds were cached: left out of the hash while they hold
# their float default, so every float build keeps the folder (and hash) it always had.
_LATER_FIELDS = ("quantization", "quant_bits", "quant_group_size")


def spec_hash(spec: BuildSpec) -> str:
    data = dataclasses.asdict(spec)
    if spec.checkpoint.quantization is None:
        for name in _LATER_FIELDS:
            data["checkpoint"].pop(name)
    payload = json.dumps({"spec": data, "fill": FILL_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def cache_path(spec: BuildSpec, root: Path | None = None) -> Path:
    root = Path(root) if root else cache_root()
    return root / f"{spec.model.name}-{spec.checkpoint.format}-{spec_hash(spec)}"


def _manifest_path(folder: Path) -> Path:
    return folder.with_name(folder.name + ".manifest.json")


def _file_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def is_valid(folder: Path) -> bool:
    """The cheap check: the manifest exists and every file it lists has its recorded size."""
    manifest = _manifest_path(folder)
    if not folder.is_dir() or not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size
               for name, size in recorded.items())


def ensure_space(spec: BuildSpec, root: Path) -> None:
    need = make_plan(spec).total_size
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    # Headroom for the zip/JSON overhead and the tokenizer/tower files.
    if free < need * 1.02 + 2**30:
        raise CacheError(f"{root}: building {spec.model.name} needs {need / 1e9:.1f} GB, only "
                         f"{free / 1e9:.1f} GB free (set {ENV_VAR} to a roomier folder)")


def cache_lock(entry: Path):
    """A lock beside a cache entry: of several processes wanting it (pytest-xdist workers,
    two CI jobs on one runner), one builds and the others wait, then find it built."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(entry) + ".lock")


def cached_build(spec: BuildSpec, root: Path | None = None) -> Path:
    """The cached folder for `spec`, building it first when missing or failing the check."""
    # heavy: torch; `import harness.synth.cache` stays light for the CLI
    from .builder import build

    folder = cache_path(spec, root)
    if is_valid(folder):
        return folder
    with cache_lock(folder):
        if is_valid(folder):  # built by another process while this one waited
            return folder
        ensure_space(spec, folder.parent)
        _manifest_path(folder).unlink(missing_ok=True)
        build(spec, folder, force=True)
        _manifest_path(folder).write_text(json.dumps(
            {"spec": dataclasses.asdict(spec), "fill": FILL_VERSION,
             "files": _file_sizes(folder)}, indent=2, sort_keys=True) + "\n")
    return folder


def remove(spec: BuildSpec, root: Path | None = None) -> None:
    folder = cache_path(spec, root)
    _manifest_path(folder).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
