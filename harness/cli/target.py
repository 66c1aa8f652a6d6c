"""What a benchmark runs on: a checkpoint folder the user names, or a preset's synthetic
checkpoint, built into the cache the first time and reused after that.

`bench extract|strip|check|merge|quant` all offer that choice. It is declared and resolved here
once, so the refusals, the note before a build and the name the results carry read the same in
every command.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.reader import open_folder
from ..errors import HarnessError
from ..synth.cache import ENV_VAR, cache_path, cache_root, cached_build, is_valid
from ..synth.presets import PRESET_NAMES, build_spec
from ..synth.specs import FORMATS, BuildSpec

DEFAULT_PRESET = "llava-v1.5-7b"


class TargetError(HarnessError):
    """The folder or preset options name no checkpoint a benchmark can run on."""


@dataclass(frozen=True)
class Target:
    folder: Path
    format: str
    name: str  # what the results call it: the folder's own name, or <model>-<format>
    spec: BuildSpec | None = None  # the preset's; None for a user's folder


def add_target(p: argparse.ArgumentParser, *, folder_flag: str, folder_help: str,
               preset_help: str) -> None:
    """One checkpoint: `--preset NAME [--format F]` (the default), or `folder_flag DIR`."""
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=PRESET_NAMES, help=preset_help)
    p.add_argument("--format", choices=FORMATS, help="default: the preset's")
    p.add_argument(folder_flag, type=Path, metavar="DIR", help=folder_help)


def add_targets(p: argparse.ArgumentParser) -> None:
    """Several: the preset in each `--format` (default: both), or each `--checkpoint DIR`."""
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=PRESET_NAMES,
                   help="cached synthetic checkpoint (built into the cache if missing)")
    p.add_argument("--format", choices=FORMATS, action="append", dest="formats",
                   help="repeatable; default: both")
    p.add_argument("--checkpoint", type=Path, action="append", dest="checkpoints",
                   metavar="DIR", help="benchmark this folder instead of a preset (repeatable)")


def user_folder(path: Path, *, flag: str = "--checkpoint") -> Target:
    """The user's folder as it is, once it is known to hold a checkpoint."""
    if not path.is_dir():
        raise TargetError(f"{flag} {path}: not a folder")
    opened = open_folder(path)  # refuses a folder without weights, naming what it looked for
    # resolve(): `.` or `..` would otherwise name the results "" or "..".
    return Target(opened.path, opened.format, path.resolve().name)


def cached_preset(preset: str, fmt: str | None = None, *,
                  with_vision_tower: bool | None = None) -> Target:
    """The preset's build from the cache, built there first (saying so) when missing."""
    spec = build_spec(preset, checkpoint={"format": fmt} if fmt else None,
                      with_vision_tower=with_vision_tower)
    root = cache_root()
    if not is_valid(cache_path(spec, root)):
        # A real-size build takes minutes and gigabytes: say where, before the wait starts.
        print(f"building {spec.model.name} ({spec.checkpoint.format}) into the cache at {root} "
              f"first (set {ENV_VAR} to use another)", file=sys.stderr)
    fmt = spec.checkpoint.format
    return Target(cached_build(spec, root), fmt, f"{spec.model.name}-{fmt}", spec)


def _no_format_for_folders(formats) -> None:
    if formats:
        raise TargetError("--format applies to --preset only (a folder has its own)")


def resolve(folder: Path | None, preset: str, fmt: str | None = None, *,
            flag: str = "--checkpoint", with_vision_tower: bool | None = None) -> Target:
    """The folder when the user named one, else the preset's cached build."""
    if folder is None:
        return cached_preset(preset, fmt, with_vision_tower=with_vision_tower)
    _no_format_for_folders(fmt)
    return user_folder(folder, flag=flag)


def resolve_all(args: argparse.Namespace) -> list[Target]:
    """What `add_targets` asked for, in the order named."""
    if args.checkpoints:
        _no_format_for_folders(args.formats)
        return [user_folder(path) for path in args.checkpoints]
    return [cached_preset(args.preset, fmt) for fmt in args.formats or FORMATS]
