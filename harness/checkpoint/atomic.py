"""Atomic output folders and files: build beside the target, rename into place only when
complete.

The temporary name carries the builder's process id (`.<name>.<pid>.<random>.partial`), so a
later build of the same target can tell a leftover of a killed process (SIGKILL, a power cut;
SIGTERM, SIGHUP and Ctrl-C clean up themselves) from one still being written, and sweeps it
with a note. Messages never name the temporary path: a failure inside it is reported under the
target's name.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import HarnessError


class OutputExistsError(HarnessError, FileExistsError):
    """The output folder exists and replacing it was not asked for."""


class StalePartialWarning(UserWarning):
    """A leftover of an interrupted build of the same target was removed."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(target: Path) -> list[Path]:
    """Remove `.<name>.<pid>.*.partial` leftovers beside `target` whose process is gone."""
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in target.parent.glob(f".{target.name}.*.partial"):
        pid = path.name[len(target.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        _remove(path)
        removed.append(path)
        warnings.warn(f"{target}: removed {path.name}, left by an interrupted run (process "
                      f"{pid})", StalePartialWarning, stacklevel=3)
    return removed


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP while a temporary is created and named: delivered
    between the two, the unwinding would find nothing to remove. They arrive on release,
    inside the cleanup's reach."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, ValueError, OSError):  # no pthreads, or not allowed here
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _remove_own_partials(target: Path) -> None:
    """Interrupted before the temporary's name was bound: remove what this process made for
    this target (the pid in the name says whose it is)."""
    for path in target.parent.glob(f".{target.name}.{os.getpid()}.*.partial"):
        _remove(path)


def _named_as_target(exc: BaseException, tmp: Path, target: Path) -> None:
    """Rewrite a message naming the temporary path to name the target instead."""
    if isinstance(exc, (HarnessError, OSError)) and str(tmp) in str(exc):
        exc.args = tuple(a.replace(str(tmp), str(target)) if isinstance(a, str) else a
                         for a in exc.args)
        if isinstance(exc, OSError) and exc.filename and str(tmp) in str(exc.filename):
            exc.filename = str(exc.filename).replace(str(tmp), str(target))


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
    sweep_stale(target)
    tmp, old = None, None
    try:
        with _signals_held():
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.",
                                        suffix=".partial", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a checkpoint folder is shared-readable
        yield tmp
        # Re-check: something may have appeared at the target while we were building.
        check_target(target, force)
        if target.exists():
            old = target.with_name(f".{target.name}.{os.getpid()}.old")
            target.rename(old)
        tmp.rename(target)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            _named_as_target(exc, tmp, target)
        else:
            _remove_own_partials(target)
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
def atomic_file(target: Path, force: bool = False, mode: int = 0o644) -> Iterator[Path]:
    """Like atomic_dir for a single file: yield a fresh temp path (not yet created, so a
    writer may create it exclusively), rename it to `target` at the end with `mode`."""
    target = Path(target).absolute()
    check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    try:
        with _signals_held():
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.",
                                        suffix=".partial", dir=target.parent)
            os.close(fd)
            tmp = Path(name)
            tmp.unlink()  # a fresh name, so the writer may create it exclusively
    except BaseException:
        _remove_own_partials(target)
        raise
    try:
        yield tmp
        os.chmod(tmp, mode)
        check_target(target, force)
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _named_as_target(exc, tmp, target)
        raise
