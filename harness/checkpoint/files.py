"""Writing output files: kernel copies of file ranges, hard links, and modes that follow the
sources' (a 0600 input never becomes a 0644 output)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import zlib
from collections.abc import Iterable
from pathlib import Path

from .paths import inside
from .problems import CheckpointError
from .tensors import Piece, piece_chunks

_COPY_CHUNK = 1 << 30
_READ_CHUNK = 8 << 20
_NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM)
DEFAULT_MODE = 0o644


def write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def mode_of(paths: Iterable[Path]) -> int:
    """The permission bits an output made from `paths` gets: what all of them allow (the
    default 0644 when there are none)."""
    modes = [stat.S_IMODE(os.stat(p).st_mode) for p in paths]
    if not modes:
        return DEFAULT_MODE
    mode = 0o777
    for m in modes:
        mode &= m
    return mode


class Output:
    """A new file written through its descriptor; file ranges are copied in the kernel
    (`copy_file_range`), falling back to read/write where the kernel or filesystem refuses."""

    def __init__(self, path: Path, mode: int = DEFAULT_MODE):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchmod(self.fd, mode)  # exactly `mode`, whatever the umask
        self.pos = 0
        self._sources: dict[Path, int] = {}
        self._in_kernel = True

    def write(self, data) -> None:
        write_all(self.fd, data)
        self.pos += len(data)

    def put(self, piece: Piece) -> None:
        if piece.data is not None:
            self.write(piece.data)
            return
        src, done = self._source(piece.path), 0
        while done < piece.nbytes:
            n = self._copy_some(src, piece.offset + done, min(piece.nbytes - done, _COPY_CHUNK))
            if n == 0:
                raise CheckpointError(f"{piece.path}: ends before byte {piece.offset + done}; "
                                      "truncated while being read?")
            done += n
        self.pos += piece.nbytes

    def _source(self, path: Path) -> int:
        if path not in self._sources:
            self._sources[path] = os.open(path, os.O_RDONLY)
        return self._sources[path]

    def _copy_some(self, src: int, offset: int, count: int) -> int:
        """Copy up to `count` bytes from `src` at `offset` to the end of this file."""
        if self._in_kernel:
            try:
                return os.copy_file_range(src, self.fd, count, offset)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                self._in_kernel = False
        data = os.pread(src, min(count, _READ_CHUNK), offset)
        write_all(self.fd, data)
        return len(data)

    def put_with_crc(self, pieces: Iterable[Piece]) -> int:
        """Write pieces through user space, returning their CRC-32 (for new zip records)."""
        crc = 0
        for piece in pieces:
            for chunk in piece_chunks(piece):
                crc = zlib.crc32(chunk, crc)
                self.write(chunk)
        return crc

    def patch(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)

    def close(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
            for fd in self._sources.values():
                os.close(fd)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link `src` at `dst` (same inode, same mode); copy it, mode kept, where the
    filesystem refuses. Returns what it did."""
    try:
        os.link(src, dst)
        return "linked"
    except OSError:
        copy_file(src, dst)
        return "copied"


def copy_file(src: Path, dst: Path) -> None:
    """A plain copy of `src`'s bytes with `src`'s permission bits (never wider), synced."""
    shutil.copyfile(src, dst)
    os.chmod(dst, mode_of([src]))
    fsync_path(dst)


def copy_files(src: Path, out: Path, names: Iterable[str]) -> list[str]:
    """Copy the side files (tokenizer, generation config) that exist, each resolved safely
    inside `src`; returns the names copied."""
    copied = []
    for name in names:
        path = inside(src, name, must_exist=False)
        if path is not None and path.is_file():
            copy_file(path, out / name)
            copied.append(name)
    return copied
