"""Where a checkpoint's files may be, and where an output may go.

Inputs: every file a checkpoint names (shards, index, config, tokenizer) is a plain name in
its folder. A symbolic link inside the folder is followed once, and refused, naming the link,
when it leaves the folder: a downloaded checkpoint must not make the harness read (and copy
into an output) a file of the user's elsewhere. Only regular files are read: a FIFO or device
would hang or never end.

Outputs: never equal to, inside, or above an input (even with --force: replacing the output
would delete the input); a side file (`--json`) never names an input or the main output; an
existing special file (a device, a FIFO) is refused, never replaced. `-` means stdout.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .problems import CheckpointError, shown

STDOUT = "-"


def plain_name(name: object, where: Path) -> str:
    """A file name in one folder: no separators, not . or .., no NUL."""
    if not isinstance(name, str) or not name or name in (".", "..") \
            or any(c in name for c in "/\\\0"):
        raise CheckpointError(f"{shown(where)}: names {shown(repr(name))}, not a file name in "
                              "the checkpoint folder")
    return name


def inside(folder: Path, name: str, must_exist: bool = True, where: Path | None = None,
           kind: str = "") -> Path | None:
    """The file `name` of `folder`, a link followed once if it stays inside the folder; None
    when it does not exist and `must_exist` is false. `where` is the file that names it and
    `kind` what it is ("shard "), for the message."""
    folder = Path(folder)
    plain_name(name, where or folder)
    path = folder / name
    if not os.path.lexists(path):
        if must_exist:
            raise CheckpointError(f"{shown(where or folder)}: names {kind}{shown(name)}, "
                                  "which does not exist")
        return None
    if path.is_symlink():
        target = path.resolve()
        root = folder.resolve()
        if root not in target.parents:
            raise CheckpointError(f"{shown(path)}: is a symbolic link that leaves the "
                                  "checkpoint folder; refusing to follow it")
        path = target
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise CheckpointError(f"{shown(folder / name)}: cannot be read ({exc.strerror})") \
            from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{shown(folder / name)}: is not a regular file")
    return path


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_output(output: Path, inputs: list[Path], what: str = "output") -> None:
    """Refuse an output that is, holds, or lies inside an input, or is a special file."""
    if str(output) == STDOUT:
        return
    output = Path(output)
    for source in inputs:
        if _overlaps(output, Path(source)):
            raise CheckpointError(f"{shown(output)}: the {what} would replace, hold or sit "
                                  f"inside an input ({shown(source)}); refusing to write over "
                                  "an input, even with --force")
    if os.path.lexists(output) and not output.is_dir():
        mode = os.lstat(output).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise CheckpointError(f"{shown(output)}: is a special file; refusing to replace it")


# Files beside the weights that transformers reads on its own when a folder is loaded.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "chat_template.jinja", "preprocessor_config.json")


def check_side_files(folder: Path) -> None:
    """Before a library reads a folder itself: none of its side files may be a link out of
    the folder or anything but a regular file."""
    for name in SIDE_FILES:
        inside(Path(folder), name, must_exist=False)
