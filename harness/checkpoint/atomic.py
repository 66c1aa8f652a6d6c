"""Atomic output folders: build beside the target, rename into place only when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import HarnessError


class OutputExistsError(HarnessError, FileExistsError):
    """The output folder exists and replacing it was not asked for."""


def check_target(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise OutputExistsError(f"{target}: output already exists; pass --force to replace it")


@contextmanager
def atomic_dir(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temp folder beside `target`; on success it becomes `target`.

    On any failure, an interrupt included, the temp folder is removed and an existing target
    is left exactly as it was. With `force`, the old target is swapped out by rename and
    deleted only after the new one is in place.
    """
    target = Path(target).absolute()
    check_target(target, force)
    if target.parent.exists() and not target.parent.is_dir():
        raise NotADirectoryError(20, "is not a folder", str(target.parent))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a checkpoint folder is normally shared-readable
    old = None
    try:
        yield tmp
        # Re-check: something may have appeared at the target while we were building.
        check_target(target, force)
        if target.exists():
            old = target.with_name(f".{target.name}.{os.getpid()}.old")
            target.rename(old)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not target.exists():
            old.rename(target)  # interrupted between the two renames: put the old one back
        raise
    if old is not None:
        try:
            _remove(old)
        except OSError as exc:  # the new output is in place; a leftover is only a warning
            warnings.warn(f"{old}: could not remove the replaced output ({exc})", stacklevel=2)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextmanager
def atomic_file(target: Path, force: bool = False) -> Iterator[Path]:
    """Like atomic_dir for a single file: yield a temp path, rename it to `target` at the end."""
    target = Path(target).absolute()
    check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
