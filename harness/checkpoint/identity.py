"""What makes two checkpoint folders the same checkpoint: their tensors' bytes and their
configuration's meaning, never what a library stamps on a save.

A folder's identity is one record per file:

- a tensor file (`.safetensors`, `.bin`): each tensor's dtype, shape and a digest of its bytes
  (how the file lays them out, its record names and its header order are not identity;
  safetensors' `__metadata__` is, since loaders read its `format`);
- a JSON file: each top-level field's canonical value (a digest when it is long), with the
  fields every save stamps (`transformers_version`, `_name_or_path`, `_commit_hash`) removed at
  any depth and absolute paths, which name the machine a folder was written on, replaced by a
  marker;
- any other file: a digest of its bytes.

Records are plain JSON, so a manifest can keep them, and `differences()` says which file and
which field or tensor differs. With both folders at hand, `folder_differences()` also says by
how much a tensor differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..tolerances import apart
from .paths import inside
from .problems import CheckpointError, shown
from .reader import MAX_JSON_BYTES, as_tensor
from .safetensors_format import scan_safetensors
from .tensors import Source, piece_chunks
from .torch_zip import scan_bin

# Written by transformers/huggingface_hub on every save, and different on every release or
# machine: never part of what a checkpoint means.
STAMPED_FIELDS = frozenset({"transformers_version", "_name_or_path", "_commit_hash"})
ABSOLUTE_PATH = "<absolute path>"
TENSOR_FILES = (".safetensors", ".bin")
# A JSON value this short is recorded as itself, so a difference can show both values.
_SHOWN_CHARS = 80
_DIGEST_HEX = 32  # 128 bits


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()[:_DIGEST_HEX]


def meaning(value):
    """A JSON value without what a save stamps on it: stamped fields removed at every depth,
    absolute paths replaced by a marker."""
    if isinstance(value, dict):
        return {k: meaning(v) for k, v in value.items() if k not in STAMPED_FIELDS}
    if isinstance(value, list):
        return [meaning(v) for v in value]
    if isinstance(value, str) and len(value) > 1 and os.path.isabs(value):
        return ABSOLUTE_PATH
    return value


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _recorded(value) -> str:
    text = canonical(value)
    return text if len(text) <= _SHOWN_CHARS else _digest(text.encode())


def json_identity(data) -> dict:
    data = meaning(data)
    if isinstance(data, dict):
        return {"kind": "json", "fields": {k: _recorded(v) for k, v in sorted(data.items())}}
    return {"kind": "json", "value": _recorded(data)}


def tensor_digest(source: Source) -> str:
    """dtype, shape and a digest of the tensor's bytes in row-major order, streamed."""
    digest = hashlib.sha256()
    for piece in source.contiguous().pieces:
        for chunk in piece_chunks(piece):
            digest.update(chunk)
    return f"{source.dtype}{list(source.shape)} sha256:{digest.hexdigest()[:_DIGEST_HEX]}"


def _resolve(folder: Path, rel: str) -> Path:
    """`rel` (a path below `folder`) as a regular file inside `folder`; a subfolder or link
    that leaves it is refused, naming it."""
    sub = folder.joinpath(*Path(rel).parts[:-1])
    root = folder.resolve()
    if sub != folder and root not in sub.resolve().parents:
        raise CheckpointError(f"{shown(sub)}: leaves the checkpoint folder; refusing to follow "
                              "it")
    return inside(sub, Path(rel).name)


def _scan(folder: Path, rel: str) -> tuple[dict[str, Source], dict | None]:
    """A tensor file's validated tensors and, for safetensors, its `__metadata__`."""
    path = _resolve(folder, rel)
    if path.suffix == ".safetensors":
        return scan_safetensors(path, folder / rel)
    return scan_bin(path, folder / rel), None


def _tensor_identity(folder: Path, rel: str) -> dict:
    sources, metadata = _scan(folder, rel)
    record = {"kind": "tensors",
              "tensors": {key: tensor_digest(s) for key, s in sorted(sources.items())}}
    if metadata is not None:
        record["metadata"] = _recorded(meaning(metadata))
    return record


def _bytes_identity(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"kind": "bytes", "sha256": digest.hexdigest()[:_DIGEST_HEX]}


def file_identity(folder: Path, rel: str) -> dict:
    """One file's record; the file is resolved inside `folder` (a link out is refused)."""
    label = folder / rel
    path = _resolve(folder, rel)
    if path.suffix in TENSOR_FILES:
        return _tensor_identity(folder, rel)
    if path.suffix == ".json":
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{shown(label)}: over the {MAX_JSON_BYTES} byte limit for "
                                  "a JSON file")
        try:
            return json_identity(json.loads(path.read_bytes()))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"{shown(label)}: not readable JSON ({shown(exc)})") from None
    return _bytes_identity(path)


def folder_identity(folder: Path) -> dict[str, dict]:
    """Every file's record, by its path relative to `folder` (subfolders included)."""
    folder = Path(folder)
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.is_file() or p.is_symlink())
    return {rel: file_identity(folder, rel) for rel in names}


def digest_of(identity: dict) -> str:
    """One short digest of a whole identity (a cache key)."""
    return _digest(canonical(identity).encode())


MISSING, EXTRA, CHANGED = "missing", "not in the record", "changed"


@dataclass(frozen=True)
class Difference:
    """Where two identities differ: a file, and in it a field or tensor (or the file itself);
    `change` is MISSING (recorded, not found), EXTRA (found, not recorded) or CHANGED."""

    file: str
    what: str  # "field", "tensor", "value", "metadata", or "" for the file as a whole
    name: str
    change: str
    detail: str = ""

    def __str__(self) -> str:
        where = " ".join(p for p in (self.what, shown(self.name)) if p)
        text = self.detail if self.change == CHANGED else self.change
        return f"{shown(self.file)}: {where + ' ' if where else ''}{text}"


def _tensor_detail(found: str, recorded: str) -> str:
    layout_f, layout_r = found.rsplit(" ", 1)[0], recorded.rsplit(" ", 1)[0]
    return "bytes differ" if layout_f == layout_r else f"is {layout_f}, recorded {layout_r}"


def _entries(file: str, what: str, recorded: dict, found: dict) -> list[Difference]:
    out = []
    for name in sorted(recorded.keys() | found.keys()):
        if name not in found:
            out.append(Difference(file, what, name, MISSING))
        elif name not in recorded:
            out.append(Difference(file, what, name, EXTRA))
        elif recorded[name] != found[name]:
            detail = (_tensor_detail(found[name], recorded[name]) if what == "tensor"
                      else f"is {found[name]}, recorded {recorded[name]}")
            out.append(Difference(file, what, name, CHANGED, detail))
    return out


def file_differences(file: str, recorded: dict, found: dict) -> list[Difference]:
    if recorded.get("kind") != found.get("kind"):
        return [Difference(file, "", "", CHANGED, f"is a {found.get('kind')} file, recorded "
                                                  f"as {recorded.get('kind')}")]
    if recorded["kind"] == "bytes":
        return [] if recorded == found else [Difference(file, "", "", CHANGED, "bytes differ")]
    out = (_entries(file, "field", recorded.get("fields", {}), found.get("fields", {}))
           + _entries(file, "tensor", recorded.get("tensors", {}), found.get("tensors", {})))
    for part in ("value", "metadata"):
        if recorded.get(part) != found.get(part):
            out.append(Difference(file, part, "", CHANGED, f"is {found.get(part)}, recorded "
                                                           f"{recorded.get(part)}"))
    return out


def differences(recorded: dict[str, dict], found: dict[str, dict]) -> list[Difference]:
    """Every file, field or tensor where two folder identities differ."""
    out = []
    for file in sorted(recorded.keys() | found.keys()):
        if file not in found:
            out.append(Difference(file, "", "", MISSING))
        elif file not in recorded:
            out.append(Difference(file, "", "", EXTRA))
        else:
            out.extend(file_differences(file, recorded[file], found[file]))
    return out


def _magnitude(a: Source, b: Source) -> str:
    """How far apart two stored tensors of one shape are (a NaN on one side only counts as an
    infinite difference)."""
    found = apart(as_tensor(a, {}), as_tensor(b, {}))
    return f"differs: {found}" if found.numel else "bytes differ (no elements)"


def folder_differences(a: Path, b: Path) -> list[Difference]:
    """`differences()` between two folders on disk (`a` as the record), with the size of each
    tensor difference where the two tensors have one dtype and shape."""
    a, b = Path(a), Path(b)
    out = []
    for diff in differences(folder_identity(a), folder_identity(b)):
        if diff.what == "tensor" and diff.detail == "bytes differ":
            sa, sb = _scan(a, diff.file)[0][diff.name], _scan(b, diff.file)[0][diff.name]
            diff = dataclasses.replace(diff, detail=_magnitude(sa, sb))
        out.append(diff)
    return out
