"""Hostile checkpoints: the project's rule for untrusted input, proven command by command.

Every crafted bad input to every command that reads checkpoints (`extract`, `strip`,
`strip --layout litgpt`, `convert --to hf`, `count`, `verify`, `merge-lora`, and `load` for representative classes)
must end in exactly one stderr line starting `llava-harness: error: ` that names the offending
file (never a `.partial` temporary path), exit code 2, no traceback, no output (the `-o` target
does not exist afterwards and nothing `.partial` is left beside it), every input file's sha256
unchanged, in bounded time and memory. Each refusal is paired with a control: the same command
on the same checkpoint before it was crafted must succeed (exit 0), so every guard is shown to
be what catches its case, and each test could fail.

Classes crafted on tiny checkpoints (`.bin` and safetensors where it applies):
  1. `.bin` records: a storage record shorter than its storage, a deflated storage record, a
     truncated shard;
  2. `.bin` pickles: a deflate bomb (~2.5 MB file, data.pkl inflating to ~2.6 GB) and a ~1 KB
     pickle whose dict key is a DAG of shared tuples (hashing it takes 2**120 steps), both in
     a measured child process (< 10 s, < 500 MB); forbidden globals (`builtins.eval`,
     `os.system`) that must never run (a marker file proves nothing did); `byteorder` big;
  3. safetensors header lies: overlapping or negative offsets, a float / negative / bool
     dimension (each crafted so shape x dtype still equals the span, so only the type check
     can catch it), `__metadata__` not str -> str, an unknown dtype, duplicate JSON keys, a
     header length past the end of the file;
  4. index lies: a wrong total_size, a weight_map naming `../outside` or `sub/x`, a missing
     shard;
  5. symbolic links leaving the folder (a shard; tokenizer.json, generation_config.json and
     config.json, which outputs would copy) are refused naming the link; links inside the
     folder are followed;
  6. outputs overlapping inputs (even with --force), special files as outputs, `--json`;
  7. control characters in keys and shard names stay escaped on one line;
  8. SIGTERM mid-build / mid-strip leaves nothing or a complete output; stale `.partial`
     folders of dead processes are swept with a warning, live ones kept;
  9. pre-quantized layouts (`count`, `strip`, `verify`, `load`): a packed weight's quant state
     missing, a quant-state shape that does not match the packed size, an unknown
     `quant_type` (in the state and in config.json), a GPTQ `qzeros` of the wrong shape.

The crafting tools (a zip writer laying records out as torch does, a safetensors header
rewriter) are themselves shown to be faithful: a checkpoint rewritten by them without any
change is accepted by every command.

`extract` is deliberately not asked to check `total_size`: it opens only the shards holding the
projector (proven in test_extraction.py), and the total needs every shard's header.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.bench.measure import run_measured
from harness.checkpoint.atomic import StalePartialWarning
from harness.cli.app import main
from harness.synth.builder import build
from harness.synth.presets import build_spec

# --- constants -----------------------------------------------------------------------------

ERROR_PREFIX = "llava-harness: error: "
EXIT_OK, EXIT_BAD_INPUT = 0, 2
EXIT_SIGTERM = 128 + signal.SIGTERM
TIME_LIMIT_S = 10.0            # every refusal, in process or in a child
MEMORY_LIMIT_BYTES = 500 * 10**6
CHILD_ALARM_S = 60             # a child that hangs (an unguarded hash bomb) is killed by this
BOMB_BLOCK = 1 << 20           # one deflate block inflates to 1 MiB of zeros (~1 KB deflated)
BOMB_BLOCKS = 2500             # data.pkl claims, and would inflate to, ~2.6 GB (< 4 GiB: zip32)
HASH_BOMB_DEPTH = 120          # hash() of the key would visit 2**120 tuples
SIGTERM_DELAY_S = 0.05         # after the temporary appears: the write is under way
DEAD_PID = 2**22 + 12345       # above PID_MAX_LIMIT (2**22): no process has it
CKPT_NAME = "llava-ckpt"       # "llava" in the name: `load` needs no name-rule warning

FORMATS = ("bin", "safetensors")
SHARDS = {"bin": ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"),
          "safetensors": ("model-00001-of-00002.safetensors",
                          "model-00002-of-00002.safetensors")}
INDEX = {"bin": "pytorch_model.bin.index.json", "safetensors": "model.safetensors.index.json"}
SUFFIX = {"bin": ".bin", "safetensors": ".safetensors"}
SHORT = {"bin": "bin", "safetensors": "st"}
# The tiny preset places the projector (and model.norm / lm_head) in the last shard, so every
# command, the lazy extractor included, reads the shard these cases damage.
NORM = "model.norm.weight"                  # float32 [64]: 256 bytes
PROJ_WEIGHT = "model.mm_projector.0.weight"  # float32 [64, 32]
PROJ_KEYS = ("model.mm_projector.0.bias", "model.mm_projector.0.weight",
             "model.mm_projector.2.bias", "model.mm_projector.2.weight")

# strip-litgpt: `strip --layout litgpt`, the litgpt export (its own writer, the same reader).
READERS = ("extract", "strip", "strip-litgpt", "convert", "count", "verify", "merge-lora")
WITH_LOAD = READERS + ("load",)
NOT_EXTRACT = tuple(c for c in READERS if c != "extract")
SIDE_FILE_READERS = ("strip", "strip-litgpt", "convert", "merge-lora")  # they copy side files
EVIL = "\n\x1b[31m"                         # a newline and an ANSI colour escape


# --- checkpoints ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Ckpt:
    folder: Path
    fmt: str

    @property
    def shard(self) -> Path:
        """The shard holding the projector, model.norm and lm_head."""
        return self.folder / SHARDS[self.fmt][1]

    @property
    def index(self) -> Path:
        return self.folder / INDEX[self.fmt]

    def read_index(self) -> dict:
        return json.loads(self.index.read_text())

    def write_index(self, data: dict) -> None:
        replace_bytes(self.index, json.dumps(data, indent=2).encode())


def tiny_spec(fmt: str):
    """The tiny preset (tokenizer, local CLIP tower, 2 shards, projector in the last)."""
    return dataclasses.replace(build_spec("tiny", checkpoint={"format": fmt}),
                               with_tokenizer=True, with_vision_tower=True)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile-pristine")
    out = {}
    for fmt in FORMATS:
        out[fmt] = root / f"{CKPT_NAME}-{fmt}"
        build(tiny_spec(fmt), out[fmt])
    return out


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A minimal LLaVA LoRA for the tiny base: rank 2 on both layers' q_proj (the base's
    config.json supplies the LLaVA config)."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("hostile-adapter") / "llava-lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
         "bias": "none"}))
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(2):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(2, 64, generator=gen)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(64, 2, generator=gen) * 0.01
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


@pytest.fixture
def make_ckpt(pristine, tmp_path) -> Callable[[str], Ckpt]:
    """`make_ckpt(fmt)` -> a private copy of the pristine checkpoint whose config names its
    own tower, to run a control on and then damage."""

    def make(fmt: str) -> Ckpt:
        folder = tmp_path / f"{CKPT_NAME}-{fmt}"
        shutil.copytree(pristine[fmt], folder, symlinks=True)
        config = json.loads((folder / "config.json").read_text())
        config["mm_vision_tower"] = str(folder / "vision_tower")
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        return Ckpt(folder, fmt)

    return make


# --- small helpers -------------------------------------------------------------------------


def replace_bytes(path: Path, data: bytes) -> None:
    """Write `path` as a new file (never through a hard link a control output may share)."""
    if os.path.lexists(path):
        path.unlink()
    path.write_bytes(data)


def tree_state(folder: Path) -> dict[str, str]:
    """Every entry under `folder`: a file's sha256 (and mode), a link's target, a folder."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = f"link -> {os.readlink(p)}"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out[rel] = f"{digest} {stat.S_IMODE(p.stat().st_mode):o}"
    return out


@dataclass
class Ran:
    code: int
    out: str
    err: str
    seconds: float


def run_cli(capsys, argv: list) -> Ran:
    capsys.readouterr()
    start = time.perf_counter()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    seconds = time.perf_counter() - start
    out, err = capsys.readouterr()
    return Ran(code, out, err, seconds)


def command_argv(command: str, ckpt: Ckpt, work: Path, adapter: Path | None) -> list:
    """The command line of `command` on `ckpt`, its outputs (if any) inside `work`."""
    folder = ckpt.folder
    return {
        "extract": ["extract", folder, "-o", work / "mm_projector.bin"],
        "strip": ["strip", folder, "-o", work / "plain"],
        "strip-litgpt": ["strip", folder, "-o", work / "litgpt", "--layout", "litgpt"],
        "convert": ["convert", folder, "-o", work / "hf", "--to", "hf"],
        "count": ["count", folder],
        "verify": ["verify", folder, "--preset", "tiny", "--format", ckpt.fmt],
        "load": ["load", folder, "--device", "cpu", "--dtype", "float32"],
        "merge-lora": ["merge-lora", "--adapter", adapter, "--base", folder, "-o",
                       work / "merged"],
    }[command]


def assert_one_error_line(ran: Ran, offender: str | Path | tuple) -> str:
    """Exit 2, nothing on stdout, exactly one stderr line starting with the error prefix and
    naming `offender`, no traceback, no temporary path, in bounded time."""
    assert ran.code == EXIT_BAD_INPUT, f"exit {ran.code}, stderr: {ran.err!r}"
    assert ran.out == "", ran.out
    assert ran.err.endswith("\n") and ran.err.count("\n") == 1, ran.err
    assert ran.err.startswith(ERROR_PREFIX), ran.err
    assert "Traceback" not in ran.err and ".partial" not in ran.err, ran.err
    for part in offender if isinstance(offender, tuple) else (offender,):
        assert str(part) in ran.err, f"{part} not named in {ran.err!r}"
    assert ran.seconds < TIME_LIMIT_S, f"took {ran.seconds:.1f} s"
    return ran.err


def control(capsys, command: str, ckpt: Ckpt, work: Path, adapter: Path | None) -> None:
    """The command on the not-yet-damaged checkpoint succeeds: the guard is what fails it."""
    work.mkdir(parents=True, exist_ok=True)
    ran = run_cli(capsys, command_argv(command, ckpt, work, adapter))
    assert ran.code == EXIT_OK, f"control failed: {ran.err}"


def assert_refused(capsys, command: str, ckpt: Ckpt, work: Path, adapter: Path | None,
                   offender: str | Path | tuple, phrase: str | None = None,
                   watch: tuple[Path, ...] = ()) -> str:
    """The command refuses (one line naming `offender`, and `phrase` if given), leaves `work`
    empty, and changes nothing in the checkpoint, the adapter or the `watch` folders."""
    work.mkdir(parents=True, exist_ok=True)
    watched = (ckpt.folder, *watch, *((adapter,) if command == "merge-lora" else ()))
    before = [tree_state(p) for p in watched]
    ran = run_cli(capsys, command_argv(command, ckpt, work, adapter))
    err = assert_one_error_line(ran, offender)
    if phrase is not None:
        assert phrase.lower() in err.lower(), err
    assert list(work.iterdir()) == [], f"output left: {sorted(work.iterdir())}"
    assert [tree_state(p) for p in watched] == before, "an input changed"
    return err


# --- crafting .bin shards --------------------------------------------------------------------


@dataclass(frozen=True)
class ZipRecord:
    name: str
    payload: bytes                 # what is stored in the file (compressed for method 8)
    method: int = zipfile.ZIP_STORED
    crc: int | None = None         # of the uncompressed bytes; default: of the payload
    size: int | None = None        # uncompressed size; default: the payload's

    @classmethod
    def deflated(cls, name: str, data: bytes) -> ZipRecord:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return cls(name, c.compress(data) + c.flush(), zipfile.ZIP_DEFLATED, zlib.crc32(data),
                   len(data))


def write_zip(path: Path, records: list[ZipRecord]) -> None:
    """A plain zip32 archive, each record's data 64-byte aligned through an 'FB' padding
    field, as torch writes its checkpoints."""
    out, central = bytearray(), bytearray()
    for r in records:
        name = r.name.encode()
        crc = zlib.crc32(r.payload) if r.crc is None else r.crc
        size = len(r.payload) if r.size is None else r.size
        offset = len(out)
        pad = -(offset + 30 + len(name) + 4) % 64
        extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, r.method, 0, 0x21, crc,
                           len(r.payload), size, len(name), len(extra)) + name + extra
        out += r.payload
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, r.method, 0, 0x21,
                               crc, len(r.payload), size, len(name), 0, 0, 0, 0, 0,
                               offset) + name
    start = len(out)
    out += central
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), len(central),
                       start, 0)
    replace_bytes(path, bytes(out))


def zip_records(path: Path) -> list[ZipRecord]:
    with zipfile.ZipFile(path) as zf:
        return [ZipRecord(i.filename, zf.read(i)) for i in zf.infolist()]


def rewrite_bin(path: Path, edit: Callable[[list[ZipRecord]], list[ZipRecord]]) -> None:
    write_zip(path, edit(zip_records(path)))


def _record(records: list[ZipRecord], suffix: str) -> int:
    (i,) = [i for i, r in enumerate(records) if r.name.endswith(suffix)]
    return i


class _StorageNames(pickle.Unpickler):
    """Our own pristine data.pkl -> {key: storage record name} (stubs, nothing resolved)."""

    def find_class(self, module, name):
        if name == "_rebuild_tensor_v2":
            return lambda storage, *_: storage
        if name == "OrderedDict":
            return dict
        return name

    def persistent_load(self, pid):
        return pid[2]


def storage_of(shard: Path, key: str) -> str:
    records = zip_records(shard)
    raw = records[_record(records, "/data.pkl")].payload
    return _StorageNames(io.BytesIO(raw)).load()[key]


def replace_record(path: Path, suffix: str, make: Callable[[ZipRecord], ZipRecord]) -> None:
    def edit(records):
        i = _record(records, suffix)
        records[i] = make(records[i])
        return records

    rewrite_bin(path, edit)


def p_str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def forbidden_global_pickle(module: str, name: str, argument: str) -> bytes:
    """{model.norm.weight: module.name(argument)}: what a poisoned checkpoint carries."""
    return (b"\x80\x02}" + p_str(NORM) + f"c{module}\n{name}\n".encode() + p_str(argument)
            + b"\x85Rs.")


def hash_bomb_pickle(depth: int = HASH_BOMB_DEPTH) -> bytes:
    """{t_depth: None} where t_0 = () and t_i = (t_{i-1}, t_{i-1}), shared through the memo:
    5 bytes per level, but hashing the key visits 2**depth tuples."""
    assert depth < 256  # one-byte memo indices
    out = bytearray(b"\x80\x02})q\x00")  # PROTO 2, EMPTY_DICT, EMPTY_TUPLE, BINPUT 0
    for i in range(1, depth + 1):  # t_{i-1} on top; BINGET i-1, TUPLE2, BINPUT i
        out += b"h" + bytes([i - 1]) + b"\x86q" + bytes([i])
    return bytes(out + b"Ns.")  # NONE, SETITEM, STOP


@functools.lru_cache(maxsize=1)
def deflate_bomb() -> ZipRecord:
    """data.pkl as a deflate stream of BOMB_BLOCKS identical full-flush blocks of zeros."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(BOMB_BLOCK)
    c.compress(zeros)
    c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)  # independent of what came before
    tail = c.flush(zlib.Z_FINISH)
    crc = 0
    for _ in range(BOMB_BLOCKS):
        crc = zlib.crc32(zeros, crc)
    return ZipRecord("data.pkl", block * BOMB_BLOCKS + tail, zipfile.ZIP_DEFLATED, crc,
                     BOMB_BLOCK * BOMB_BLOCKS)


# --- crafting safetensors shards ---------------------------------------------------------------


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors_raw(path: Path, header: str | bytes, data: bytes,
                          length_past_end: bool = False) -> None:
    """The 8-byte length, the header text (space-padded to 8 bytes) and the data section; the
    length may claim one byte more than the whole file holds."""
    text = header.encode() if isinstance(header, str) else header
    text += b" " * (-len(text) % 8)
    length = len(text) + len(data) + 1 if length_past_end else len(text)  # vs size - 8
    replace_bytes(path, length.to_bytes(8, "little") + text + data)


def compact(header: dict) -> str:
    return json.dumps(header, separators=(",", ":"))


def edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    header, data = read_safetensors(path)
    edit(header)
    write_safetensors_raw(path, compact(header), data)


def by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"),
                  key=lambda k: header[k]["data_offsets"][0])


# --- the crafts: each damages a copy and returns what the message must name -------------------

# A craft damages a copy and returns what the refusal must name: a path, or several strings
# that must all appear (the folder and an escaped fragment).
Craft = Callable[[Ckpt, Path], "Path | str | tuple"]


def short_storage(ck: Ckpt, tmp: Path) -> Path:
    name = storage_of(ck.shard, NORM)
    replace_record(ck.shard, f"/data/{name}", lambda r: ZipRecord(r.name, r.payload[:16]))
    return ck.shard


def deflated_storage(ck: Ckpt, tmp: Path) -> Path:
    name = storage_of(ck.shard, NORM)
    replace_record(ck.shard, f"/data/{name}", lambda r: ZipRecord.deflated(r.name, r.payload))
    return ck.shard


def truncated_shard(ck: Ckpt, tmp: Path) -> Path:
    data = ck.shard.read_bytes()
    replace_bytes(ck.shard, data[: len(data) // 2])
    return ck.shard


def forbidden_global(module: str, name: str) -> Craft:
    def craft(ck: Ckpt, tmp: Path) -> Path:
        marker = tmp / "pwned"
        code = (f"open({str(marker)!r}, 'w').close()" if name in ("eval", "exec")
                else f"touch {marker}")
        pkl = forbidden_global_pickle(module, name, code)
        replace_record(ck.shard, "/data.pkl", lambda r: ZipRecord(r.name, pkl))
        return ck.shard

    return craft


def big_endian(ck: Ckpt, tmp: Path) -> Path:
    replace_record(ck.shard, "/byteorder", lambda r: ZipRecord(r.name, b"big"))
    return ck.shard


def overlapping_offsets(ck: Ckpt, tmp: Path) -> Path:
    def edit(header):
        first, second = by_offset(header)[:2]
        end = header[first]["data_offsets"][1]
        start, stop = header[second]["data_offsets"]
        header[second]["data_offsets"] = [end - 4, end - 4 + stop - start]

    edit_header(ck.shard, edit)
    return ck.shard


def negative_offsets(ck: Ckpt, tmp: Path) -> Path:
    def edit(header):
        start, stop = header[NORM]["data_offsets"]
        header[NORM]["data_offsets"] = [-(stop - start), 0]  # the span still fits the shape

    edit_header(ck.shard, edit)
    return ck.shard


def shape_edit(key: str, change: Callable[[list], list]) -> Craft:
    """`key`'s shape changed so that its element count (and so its span) stays the same."""

    def craft(ck: Ckpt, tmp: Path) -> Path:
        def edit(header):
            header[key]["shape"] = change(header[key]["shape"])

        edit_header(ck.shard, edit)
        return ck.shard

    return craft


def metadata_not_strings(ck: Ckpt, tmp: Path) -> Path:
    edit_header(ck.shard, lambda h: h.update({"__metadata__": {"format": "pt", "step": 3}}))
    return ck.shard


def unknown_dtype(ck: Ckpt, tmp: Path) -> Path:
    edit_header(ck.shard, lambda h: h[NORM].update({"dtype": "Q4_K"}))
    return ck.shard


def duplicate_keys(ck: Ckpt, tmp: Path) -> Path:
    header, data = read_safetensors(ck.shard)
    first, second = by_offset(header)[:2]
    text = compact(header)
    # The same name twice: a last-wins parser would read `second`'s bytes under `first`'s name.
    text = text[:-1] + f", {json.dumps(first)}: {json.dumps(header[second])}}}"
    write_safetensors_raw(ck.shard, text, data)
    return ck.shard


def header_past_the_end(ck: Ckpt, tmp: Path) -> Path:
    header, data = read_safetensors(ck.shard)
    write_safetensors_raw(ck.shard, compact(header), data, length_past_end=True)
    return ck.shard


def wrong_total_size(ck: Ckpt, tmp: Path) -> Path:
    index = ck.read_index()
    index["metadata"]["total_size"] += 1
    ck.write_index(index)
    return ck.index


def weight_map_names(target: str, place: Callable[[Ckpt, Path], Path | None]) -> Craft:
    """Map every projector key to `target` (a copy of the real shard placed where the lie
    points, if `place` says where), so following the lie would even work."""

    def craft(ck: Ckpt, tmp: Path) -> Path:
        name = target.format(suffix=SUFFIX[ck.fmt])
        where = place(ck, tmp)
        if where is not None:
            where.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ck.shard, where)
        index = ck.read_index()
        index["weight_map"].update({k: name for k in PROJ_KEYS})
        ck.write_index(index)
        return ck.index

    return craft


def shard_link_outside(ck: Ckpt, tmp: Path) -> Path:
    outside = tmp / "elsewhere" / ck.shard.name
    outside.parent.mkdir(exist_ok=True)
    shutil.copyfile(ck.shard, outside)
    outside.chmod(0o600)
    ck.shard.unlink()
    ck.shard.symlink_to(outside)
    return ck.shard


def side_file_link_outside(name: str) -> Craft:
    def craft(ck: Ckpt, tmp: Path) -> Path:
        path = ck.folder / name
        outside = tmp / "elsewhere" / name
        outside.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, outside)
        outside.chmod(0o600)
        path.unlink()
        path.symlink_to(outside)
        return path

    return craft


def key_with_control_chars(ck: Ckpt, tmp: Path) -> str:
    """The index lists a projector key with a newline and an escape in it, in a shard that
    does not hold it; the message must show it escaped."""
    index = ck.read_index()
    index["weight_map"][f"model.mm_projector.{EVIL}9.weight"] = ck.shard.name
    ck.write_index(index)
    return ck.folder, "model.mm_projector.\\n\\x1b[31m9.weight"


def shard_name_with_control_chars(ck: Ckpt, tmp: Path) -> str:
    """The projector's shard renamed to a name with a newline and an escape (the index
    following it), then truncated."""
    evil = ck.folder / f"model{EVIL}-00002{SUFFIX[ck.fmt]}"
    data = ck.shard.read_bytes()
    ck.shard.unlink()
    evil.write_bytes(data[: len(data) // 2])
    index = ck.read_index()
    index["weight_map"] = {k: (evil.name if f == ck.shard.name else f)
                           for k, f in index["weight_map"].items()}
    ck.write_index(index)
    return ck.folder, "model\\n\\x1b[31m-00002" + SUFFIX[ck.fmt]


@dataclass(frozen=True)
class Hostile:
    name: str
    fmt: str
    craft: Craft
    commands: tuple[str, ...]
    phrase: str | None = None   # a word the refusal must contain (the guard that caught it)
    escaped: bool = False       # the offender holds control characters: check the escaping

    def __str__(self) -> str:
        return self.name


HOSTILE = [
    # 1. .bin records
    Hostile("bin-short-storage-record", "bin", short_storage, WITH_LOAD, "needs"),
    Hostile("bin-deflated-storage-record", "bin", deflated_storage, READERS, "compressed"),
    Hostile("bin-truncated-shard", "bin", truncated_shard, WITH_LOAD, "truncated"),
    Hostile("st-truncated-shard", "safetensors", truncated_shard, READERS, "truncated"),
    # 2. .bin pickles (the bombs are measured in child processes, below)
    Hostile("bin-pickle-builtins-eval", "bin", forbidden_global("builtins", "eval"), WITH_LOAD,
            "builtins.eval"),
    Hostile("bin-pickle-os-system", "bin", forbidden_global("os", "system"), READERS,
            "os.system"),
    Hostile("bin-byteorder-big", "bin", big_endian, READERS, "endian"),
    # 3. safetensors header lies
    Hostile("st-overlapping-offsets", "safetensors", overlapping_offsets, WITH_LOAD, "overlap"),
    Hostile("st-negative-offsets", "safetensors", negative_offsets, WITH_LOAD, "data_offsets"),
    Hostile("st-float-dimension", "safetensors", shape_edit(PROJ_WEIGHT, lambda s: [float(s[0]), s[1]]),
            READERS, "shape"),
    Hostile("st-negative-dimension", "safetensors", shape_edit(PROJ_WEIGHT, lambda s: [-s[0], -s[1]]),
            READERS, "shape"),
    Hostile("st-bool-dimension", "safetensors", shape_edit(NORM, lambda s: [True, *s]), READERS,
            "shape"),
    Hostile("st-metadata-not-str-to-str", "safetensors", metadata_not_strings, READERS,
            "__metadata__"),
    Hostile("st-unknown-dtype", "safetensors", unknown_dtype, READERS, "Q4_K"),
    Hostile("st-duplicate-json-keys", "safetensors", duplicate_keys, READERS, "duplicate"),
    Hostile("st-header-length-past-the-end", "safetensors", header_past_the_end, READERS,
            "header length"),
    # 4. index lies (extract reads only the projector's shard: it cannot see total_size)
    *[h for fmt in FORMATS for h in (
        Hostile(f"{SHORT[fmt]}-index-wrong-total-size", fmt, wrong_total_size, NOT_EXTRACT,
                "total_size"),
        Hostile(f"{SHORT[fmt]}-index-names-parent-path", fmt,
                weight_map_names("../outside{suffix}",
                                 lambda ck, tmp: ck.folder.parent / f"outside{SUFFIX[ck.fmt]}"),
                READERS, "not a file name"),
        Hostile(f"{SHORT[fmt]}-index-names-subfolder-path", fmt,
                weight_map_names("sub/x{suffix}",
                                 lambda ck, tmp: ck.folder / "sub" / f"x{SUFFIX[ck.fmt]}"),
                READERS, "not a file name"),
        Hostile(f"{SHORT[fmt]}-index-names-missing-shard", fmt,
                weight_map_names("model-00003-of-00003{suffix}", lambda ck, tmp: None),
                WITH_LOAD if fmt == "bin" else READERS, "does not exist"))],
    # 5. symbolic links out of the folder
    Hostile("bin-shard-symlink-outside", "bin", shard_link_outside, WITH_LOAD,
        "symbolic link"),
    Hostile("st-shard-symlink-outside", "safetensors", shard_link_outside, READERS,
        "symbolic link"),
    Hostile("bin-tokenizer-json-symlink-outside", "bin", side_file_link_outside(
        "tokenizer.json"), SIDE_FILE_READERS + ("load",), "symbolic link"),
    Hostile("bin-generation-config-symlink-outside", "bin", side_file_link_outside(
        "generation_config.json"), SIDE_FILE_READERS, "symbolic link"),
    Hostile("st-config-json-symlink-outside", "safetensors", side_file_link_outside(
        "config.json"), ("strip", "strip-litgpt", "convert", "count", "merge-lora", "load"),
        "symbolic link"),
    # 7. control characters in what messages name
    Hostile("bin-key-with-control-chars", "bin", key_with_control_chars, WITH_LOAD,
            escaped=True),
    Hostile("st-shard-name-with-control-chars", "safetensors", shard_name_with_control_chars,
            WITH_LOAD, escaped=True),
]
MATRIX = [pytest.param(h, c, id=f"{h.name}-{c}") for h in HOSTILE for c in h.commands]


@pytest.mark.parametrize("hostile, command", MATRIX)
def test_hostile_input_is_one_line_exit_2_no_output(make_ckpt, adapter, tmp_path, capsys,
                                                    hostile, command):
    ck = make_ckpt(hostile.fmt)
    control(capsys, command, ck, tmp_path / "control", adapter)
    offender = hostile.craft(ck, tmp_path)
    # Watching all of tmp_path: the files a lie points to (elsewhere/, outside.*) and the
    # control's outputs stay as they are too.
    err = assert_refused(capsys, command, ck, tmp_path / "out", adapter, offender,
                         hostile.phrase, watch=(tmp_path,))
    if hostile.escaped:
        assert "\x1b" not in err and "\\x1b" in err and "\\n" in err, err
    assert not (tmp_path / "pwned").exists(), "a pickled call ran"


# --- 9. pre-quantized checkpoints ----------------------------------------------------------
# A quantized linear is several tensors (harness/checkpoint/quantized.py); each way they can
# disagree is refused by every command that reads the quantized layout, before anything is
# written or handed to bitsandbytes. (`extract` reads only the float projector: not affected.)

QUANT_COMMANDS = ("count", "strip", "verify", "load")
Q_LINEAR = "model.layers.0.self_attn.q_proj"
NF4_STATE = f"{Q_LINEAR}.weight.quant_state.bitsandbytes__nf4"


def quant_spec(q: str):
    spec = build_spec("tiny-quant", checkpoint={"format": "safetensors", "quantization": q,
                                                "quant_group_size": 32})
    return dataclasses.replace(spec, with_tokenizer=True, with_vision_tower=True)


@pytest.fixture(scope="module")
def quant_pristine(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile-quant")
    out = {}
    for q in ("nf4-dq", "gptq"):
        out[q] = root / f"{CKPT_NAME}-{q}"
        build(quant_spec(q), out[q])
    return out


def quant_argv(command: str, q: str, folder: Path, work: Path) -> list:
    if command == "verify":
        return ["verify", folder, "--preset", "tiny-quant", "--format", "safetensors",
                "--quantization", q, "--quant-group-size", "32"]
    return command_argv(command, Ckpt(folder, "safetensors"), work, None)


def repack(ck: Ckpt, key: str, replace: Callable[[dict, bytes], tuple[dict, bytes] | None]
           ) -> Path:
    """Rewrite the shard holding `key` with that tensor's entry and bytes replaced (None:
    dropped), every span laid out again and the index kept in step: a well-formed file whose
    only fault is the one crafted. Returns the shard."""
    shard = ck.folder / json.loads(ck.index.read_text())["weight_map"][key]
    header, data = read_safetensors(shard)
    metadata = header.pop("__metadata__", None)
    entries = {}
    for name in by_offset(header):
        start, stop = header[name]["data_offsets"]
        entry, raw = header[name], data[start:stop]
        if name == key:
            made = replace(entry, raw)
            if made is None:
                continue
            entry, raw = made
        entries[name] = (entry, raw)
    new_header, chunks, pos = ({"__metadata__": metadata} if metadata else {}), [], 0
    for name, (entry, raw) in entries.items():
        new_header[name] = {**entry, "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    write_safetensors_raw(shard, compact(new_header), b"".join(chunks))
    index = json.loads(ck.index.read_text())
    if key not in entries:
        del index["weight_map"][key]
    index["metadata"]["total_size"] += sum(len(r) for _, r in entries.values()) - len(data)
    ck.write_index(index)
    return shard


def quant_state_edit(**fields) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    def edit(entry: dict, raw: bytes) -> tuple[dict, bytes]:
        text = json.dumps({**json.loads(raw), **fields}).encode()
        return {**entry, "shape": [len(text)]}, text
    return edit


def missing_absmax(ck: Ckpt, tmp: Path) -> Path:
    return repack(ck, f"{Q_LINEAR}.weight.absmax", lambda entry, raw: None)


def shape_not_its_packed_size(ck: Ckpt, tmp: Path) -> Path:
    return repack(ck, NF4_STATE, quant_state_edit(shape=[64, 128]))


def unknown_state_quant_type(ck: Ckpt, tmp: Path) -> Path:
    return repack(ck, NF4_STATE, quant_state_edit(quant_type="nf5"))


def unknown_config_quant_type(ck: Ckpt, tmp: Path) -> Path:
    config = json.loads((ck.folder / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_quant_type"] = "nf5"
    replace_bytes(ck.folder / "config.json", json.dumps(config, indent=2).encode())
    return ck.folder / "config.json"


def gptq_qzeros_transposed(ck: Ckpt, tmp: Path) -> Path:
    # Same bytes, same span: only the layout check can see it.
    return repack(ck, f"{Q_LINEAR}.qzeros",
                  lambda entry, raw: ({**entry, "shape": entry["shape"][::-1]}, raw))


QUANT_HOSTILE = [
    ("nf4-dq-quant-state-missing", "nf4-dq", missing_absmax, QUANT_COMMANDS, "missing"),
    ("nf4-dq-shape-not-its-packed-size", "nf4-dq", shape_not_its_packed_size, QUANT_COMMANDS,
     "64 x 128"),
    ("nf4-dq-unknown-quant-type-in-state", "nf4-dq", unknown_state_quant_type, QUANT_COMMANDS,
     "quant_type"),
    ("nf4-dq-unknown-quant-type-in-config", "nf4-dq", unknown_config_quant_type,
     QUANT_COMMANDS, "bnb_4bit_quant_type"),
    # GPTQ runs nowhere here (load refuses it with a reason): the readers only.
    ("gptq-qzeros-transposed", "gptq", gptq_qzeros_transposed, ("count", "strip", "verify"),
     "expected"),
]
QUANT_MATRIX = [pytest.param(q, craft, command, phrase, id=f"{name}-{command}")
                for name, q, craft, commands, phrase in QUANT_HOSTILE for command in commands]


@pytest.mark.parametrize("q, craft, command, phrase", QUANT_MATRIX)
def test_hostile_quantized_layout_is_one_line_exit_2_no_output(quant_pristine, tmp_path, capsys,
                                                                q, craft, command, phrase):
    folder = tmp_path / f"{CKPT_NAME}-{q}"
    shutil.copytree(quant_pristine[q], folder)
    config = json.loads((folder / "config.json").read_text())
    config["mm_vision_tower"] = str(folder / "vision_tower")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    ck = Ckpt(folder, "safetensors")
    (tmp_path / "control").mkdir()
    ran = run_cli(capsys, quant_argv(command, q, folder, tmp_path / "control"))
    assert ran.code == EXIT_OK, f"control failed: {ran.err}"
    offender = craft(ck, tmp_path)
    work = tmp_path / "out"
    work.mkdir()
    before = tree_state(tmp_path)
    err = assert_one_error_line(run_cli(capsys, quant_argv(command, q, folder, work)), offender)
    assert phrase in err, err
    assert list(work.iterdir()) == [] and tree_state(tmp_path) == before


# --- the crafting tools themselves are faithful ---------------------------------------------


def neutral_rewrite(ck: Ckpt, tmp: Path) -> None:
    if ck.fmt == "bin":
        rewrite_bin(ck.shard, lambda records: records)
    else:
        edit_header(ck.shard, lambda header: None)


@pytest.mark.parametrize("command", WITH_LOAD)
@pytest.mark.parametrize("fmt", FORMATS)
def test_crafting_tools_alone_change_nothing_the_commands_see(make_ckpt, adapter, tmp_path,
                                                              capsys, fmt, command):
    ck = make_ckpt(fmt)
    before = ck.shard.read_bytes()
    neutral_rewrite(ck, tmp_path)
    if fmt == "bin":  # laid out by write_zip now, not by torch's writer
        assert ck.shard.read_bytes() != before
    control(capsys, command, ck, tmp_path / "out", adapter)


def test_crafted_pickles_and_bombs_are_what_they_claim(tmp_path):
    """The payloads are real: the forbidden global runs under plain pickle, the hash bomb's key
    is 2**depth tuples deep, the deflate bomb inflates to zeros (checked on a short prefix)."""
    marker = tmp_path / "ran"
    pickle.loads(forbidden_global_pickle("builtins", "eval",
                                         f"open({str(marker)!r}, 'w').close()"))
    assert marker.exists()

    raw = hash_bomb_pickle(8)
    (key,) = pickle.loads(raw)  # depth 8: 256 tuples to hash
    depth = 0
    while key:
        assert key[0] is key[1]
        key, depth = key[0], depth + 1
    assert depth == 8 and len(hash_bomb_pickle()) < 1024
    bomb = deflate_bomb()
    assert len(bomb.payload) < 3 * 2**20 and bomb.size > 2 * 10**9
    head = zlib.decompressobj(-15).decompress(bomb.payload[:4096], 3 * BOMB_BLOCK)
    assert head == bytes(len(head)) and len(head) >= BOMB_BLOCK


# --- resource bombs: in a measured child process ------------------------------------------------

CHILD = ("import signal, sys; signal.alarm(%d); from harness.cli.app import main; "
         "sys.exit(main(sys.argv[1:]))" % CHILD_ALARM_S)
# Each child pays its command's imports; verify stands for the torch-importing commands
# (merge-lora and load refuse through the same open_folder(...).check() before any work).
BOMB_COMMANDS = ("extract", "strip", "count", "convert", "verify")


def bomb_shard(ck: Ckpt, kind: str) -> None:
    if kind == "deflate-bomb":
        rewrite_bin(ck.shard, lambda records: [
            dataclasses.replace(deflate_bomb(), name=r.name) if r.name.endswith("/data.pkl")
            else r for r in records])
    else:
        pkl = hash_bomb_pickle()
        replace_record(ck.shard, "/data.pkl", lambda r: ZipRecord(r.name, pkl))


@pytest.mark.parametrize("command", BOMB_COMMANDS)
@pytest.mark.parametrize("kind", ["deflate-bomb", "hash-bomb"])
def test_pickle_bombs_are_refused_in_bounded_time_and_memory(make_ckpt, adapter, tmp_path,
                                                             capsys, kind, command):
    ck = make_ckpt("bin")
    control(capsys, command, ck, tmp_path / "control", adapter)
    bomb_shard(ck, kind)
    if kind == "deflate-bomb":
        assert ck.shard.stat().st_size < 4 * 2**20
    before = tree_state(ck.folder)
    work = tmp_path / "out"
    work.mkdir()
    argv = [str(a) for a in command_argv(command, ck, work, adapter)]
    measured = run_measured([sys.executable, "-c", CHILD, *argv])
    ran = Ran(measured.returncode, "", measured.stderr, measured.wall_s)
    assert_one_error_line(ran, ck.shard)
    assert measured.wall_s < TIME_LIMIT_S
    assert measured.peak_rss_bytes < MEMORY_LIMIT_BYTES, \
        f"peak RSS {measured.peak_rss_bytes / 1e6:.0f} MB"
    assert list(work.iterdir()) == [] and tree_state(ck.folder) == before


# --- 5. links inside the folder are followed ----------------------------------------------------


@pytest.mark.parametrize("command", WITH_LOAD)
def test_links_inside_the_folder_are_followed(make_ckpt, adapter, tmp_path, capsys, command):
    """A shard and tokenizer.json kept as links into a blobs/ folder inside the checkpoint (as
    a download cache lays them out) are read: every command succeeds."""
    ck = make_ckpt("bin")
    blobs = ck.folder / "blobs"
    blobs.mkdir()
    for path in (ck.shard, ck.folder / "tokenizer.json"):
        blob = blobs / hashlib.sha256(path.read_bytes()).hexdigest()
        path.rename(blob)
        path.symlink_to(Path("blobs") / blob.name)
    before = tree_state(ck.folder)
    work = tmp_path / "out"
    work.mkdir()
    ran = run_cli(capsys, command_argv(command, ck, work, adapter))
    assert ran.code == EXIT_OK, ran.err
    assert tree_state(ck.folder) == before
    if command == "strip":
        copied = work / "plain" / "tokenizer.json"
        assert not copied.is_symlink()
        assert copied.read_bytes() == (ck.folder / "tokenizer.json").read_bytes()


def test_side_file_link_outside_is_never_copied(make_ckpt, tmp_path, capsys):
    """The refusal of a tokenizer.json linked to a private file elsewhere leaves no copy of
    that file anywhere (a sharp check of what `strip` would have leaked)."""
    ck = make_ckpt("bin")
    side_file_link_outside("tokenizer.json")(ck, tmp_path)
    secret = (tmp_path / "elsewhere" / "tokenizer.json").read_bytes()
    ran = run_cli(capsys, ["strip", ck.folder, "-o", tmp_path / "plain", "--force"])
    assert ran.code == EXIT_BAD_INPUT, ran.err
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()
              and p.parent != tmp_path / "elsewhere" and p.read_bytes() == secret]
    assert leaked == []


# --- 6. outputs overlapping inputs, special files, stdout ---------------------------------------


STRIP = ["strip", "CKPT", "-o", "OUT"]
EXTRACT = ["extract", "CKPT", "-o", "OUT"]
MERGE = ["merge-lora", "--adapter", "ADAPTER", "--base", "CKPT", "-o", "OUT"]
# case -> (command template, the overlapping OUT / SIDE it is given instead of fresh paths)
OVERLAPS = {
    "strip-o-ckpt": (STRIP, lambda ck, ad: {"OUT": ck.folder}),
    "strip-o-inside-ckpt": (STRIP, lambda ck, ad: {"OUT": ck.folder / "sub"}),
    "strip-o-parent-of-ckpt": (STRIP, lambda ck, ad: {"OUT": ck.folder.parent}),
    "strip-o-ckpt-dotdot": (STRIP, lambda ck, ad: {"OUT": ck.folder / ".."}),
    "convert-o-inside-ckpt": (["convert", "CKPT", "-o", "OUT", "--to", "hf"],
                              lambda ck, ad: {"OUT": ck.folder / "hf"}),
    "extract-o-inside-ckpt": (EXTRACT, lambda ck, ad: {"OUT": ck.folder / "mm.bin"}),
    "extract-o-a-shard": (EXTRACT, lambda ck, ad: {"OUT": ck.shard}),
    "merge-o-base": (MERGE, lambda ck, ad: {"OUT": ck.folder}),
    "merge-o-adapter": (MERGE, lambda ck, ad: {"OUT": ad}),
    "merge-o-inside-adapter": (MERGE, lambda ck, ad: {"OUT": ad / "merged"}),
}


def _fill(template: list, values: dict) -> list:
    return [values.get(word, word) for word in template]


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("case", OVERLAPS)
def test_output_overlapping_an_input_is_refused(make_ckpt, adapter, tmp_path, capsys, case,
                                                force):
    ck = make_ckpt("bin")
    template, overlapping = OVERLAPS[case]
    flags = ["--force"] if force else []
    fresh = {"CKPT": ck.folder, "ADAPTER": adapter, "OUT": tmp_path / "control" / "out.bin",
             "SIDE": tmp_path / "control" / "summary.json"}
    # Control: the same command with fresh output paths succeeds.
    ran = run_cli(capsys, _fill(template, fresh) + flags)
    assert ran.code == EXIT_OK, ran.err
    hostile = overlapping(ck, adapter)
    (named,) = hostile.values()
    watched = [ck.folder, adapter, tmp_path]
    before = [tree_state(p) for p in watched]
    hostile_out = {**fresh, "OUT": tmp_path / "x.bin", **hostile}
    ran = run_cli(capsys, _fill(template, hostile_out) + flags)
    assert_one_error_line(ran, named)
    assert [tree_state(p) for p in watched] == before, "an input changed or an output appeared"


@pytest.fixture
def fifo(tmp_path):
    """A FIFO named like an output, held open for reading so a wrongful writer never blocks."""
    path = tmp_path / "out.bin"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    yield path
    os.close(reader)


SPECIAL_OUTPUTS = {
    # how -> argv(ckpt, main output, the path standing for the special file)
    "extract-o-fifo": lambda ck, out, sp: ["extract", ck.folder, "-o", sp],
    "strip-o-fifo": lambda ck, out, sp: ["strip", ck.folder, "-o", sp],
}


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("how", SPECIAL_OUTPUTS)
def test_special_file_output_is_refused_never_replaced(make_ckpt, fifo, tmp_path, capsys, how,
                                                       force):
    ck = make_ckpt("bin")
    # Control: the same command, the FIFO's place taken by a regular path, works.
    ok = tmp_path / "control"
    ok.mkdir()
    ran = run_cli(capsys, SPECIAL_OUTPUTS[how](ck, ok / "p.bin", ok / "side.bin"))
    assert ran.code == EXIT_OK, ran.err
    before = tree_state(ck.folder)
    out = tmp_path / "p.bin"
    ran = run_cli(capsys, SPECIAL_OUTPUTS[how](ck, out, fifo) + (["--force"] if force else []))
    assert_one_error_line(ran, fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced"
    assert tree_state(ck.folder) == before
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_dev_null_as_output_is_refused(make_ckpt, tmp_path, capsys):
    """Without --force only: an existing output is refused twice over, so even a regressed
    special-file check cannot replace /dev/null here (the FIFO cases above use --force)."""
    ck = make_ckpt("bin")
    assert run_cli(capsys, ["extract", ck.folder, "-o", tmp_path / "p.bin"]).code == EXIT_OK
    before = tree_state(ck.folder)
    ran = run_cli(capsys, ["extract", ck.folder, "-o", "/dev/null"])
    assert_one_error_line(ran, "/dev/null")
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)
    assert tree_state(ck.folder) == before


def test_extract_json_prints_the_summary_alone_on_stdout(make_ckpt, tmp_path, capsys,
                                                          monkeypatch):
    ck = make_ckpt("bin")
    monkeypatch.chdir(tmp_path)
    ran = run_cli(capsys, ["extract", ck.folder, "-o", tmp_path / "p.bin", "--json"])
    assert ran.code == EXIT_OK, ran.err
    summary = json.loads(ran.out)
    assert "extracted 4 tensors" in ran.err
    assert sorted(summary["keys"]) == sorted(PROJ_KEYS)
    assert summary["files_read"] == [ck.shard.name]
    assert (tmp_path / "p.bin").is_file()
    # '-' names stdout only where the output is one text file; a checkpoint file is not.
    ran = run_cli(capsys, ["extract", ck.folder, "-o", "-"])
    assert ran.code == EXIT_BAD_INPUT and "'-' (stdout)" in ran.err
    assert not (tmp_path / "-").exists()


# --- 8. interrupts and stale temporaries --------------------------------------------------------


def _sigterm_once_partial_appears(argv: list, target: Path) -> tuple[subprocess.Popen, bool,
                                                                     str]:
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *map(str, argv)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sent, deadline = False, time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if list(target.parent.glob(f".{target.name}.*.partial")):
            # Mid-write, not the instant the folder appears (that instant is pinned down
            # deterministically, in process, below).
            time.sleep(SIGTERM_DELAY_S)
            proc.send_signal(signal.SIGTERM)
            sent = True
            break
        time.sleep(0.002)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, sent, err


@pytest.mark.parametrize("what", ["build", "strip"])
def test_sigterm_mid_write_leaves_nothing_or_a_complete_output(pristine, tmp_path, capsys,
                                                               what):
    if what == "build":
        target = tmp_path / "built"
        argv = ["build", "--preset", "tiny", "-o", target]
    else:
        target = tmp_path / "plain"
        argv = ["strip", pristine["bin"], "-o", target]
    before = tree_state(pristine["bin"])
    proc, sent, err = _sigterm_once_partial_appears(argv, target)
    assert sent, "the command finished before its temporary folder was seen"
    assert not list(tmp_path.glob(f".{target.name}.*")), "a temporary was left behind"
    assert tree_state(pristine["bin"]) == before
    if target.exists():  # it finished first (or was stopped after the rename): complete
        if what == "build":
            assert run_cli(capsys, ["verify", target, "--preset", "tiny"]).code == EXIT_OK
        else:
            from harness.ops.strip import strict_problems

            assert strict_problems(target) == []
    if proc.returncode == -signal.SIGTERM:
        # Delivered after the command had put its output in place and let go of its handler
        # (on its way out): the default action ends it, the output complete.
        assert target.exists(), err
    elif proc.returncode != EXIT_OK:
        assert proc.returncode == EXIT_SIGTERM, err
        assert "SIGTERM" in err and "Traceback" not in err, err


@pytest.mark.parametrize("command, maker", [("build", "mkdtemp"), ("extract", "mkstemp")])
def test_sigterm_the_instant_the_temporary_exists_leaves_nothing(make_ckpt, tmp_path, capsys,
                                                                 monkeypatch, command, maker):
    """A signal is delivered at any bytecode boundary, also the first one after the temporary
    was created: simulated deterministically by raising the CLI's SIGTERM exception as
    tempfile returns. Nothing may be left behind, as the message then claims."""
    from harness.cli.app import Terminated

    target = tmp_path / ("built" if command == "build" else "mm_projector.bin")
    argv = (["build", "--preset", "tiny", "-o", target] if command == "build"
            else ["extract", make_ckpt("bin").folder, "-o", target])
    assert run_cli(capsys, argv).code == EXIT_OK  # control
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    real = getattr(tempfile, maker)

    def then_sigterm(*args, **kwargs):
        real(*args, **kwargs)  # the temporary now exists
        raise Terminated(signal.SIGTERM)

    monkeypatch.setattr(tempfile, maker, then_sigterm)
    ran = run_cli(capsys, argv)
    assert ran.code == EXIT_SIGTERM and "nothing was left behind" in ran.err, ran.err
    assert not target.exists()
    assert not list(tmp_path.glob(f".{target.name}.*")), "a temporary was left behind"


def test_stale_partial_of_a_dead_process_is_swept_with_a_warning(tmp_path, capsys):
    with pytest.raises(ProcessLookupError):
        os.kill(DEAD_PID, 0)
    target = tmp_path / "built"
    stale = tmp_path / f".built.{DEAD_PID}.k3x9.partial"
    stale.mkdir()
    (stale / "pytorch_model-00001-of-00002.bin").write_bytes(b"half a shard")
    with pytest.warns(StalePartialWarning, match=str(DEAD_PID)):
        ran = run_cli(capsys, ["build", "--preset", "tiny", "-o", target])
    assert ran.code == EXIT_OK, ran.err
    assert not stale.exists()
    assert run_cli(capsys, ["verify", target, "--preset", "tiny"]).code == EXIT_OK
    assert not list(tmp_path.glob(".built.*"))


def test_partial_of_a_live_process_is_kept(tmp_path, capsys):
    """The control of the sweep: the same leftover, but its process is alive."""
    child = subprocess.Popen(["sleep", "60"])
    try:
        target = tmp_path / "built"
        live = tmp_path / f".built.{child.pid}.k3x9.partial"
        live.mkdir()
        (live / "pytorch_model-00001-of-00002.bin").write_bytes(b"being written")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ran = run_cli(capsys, ["build", "--preset", "tiny", "-o", target])
        assert ran.code == EXIT_OK, ran.err
        assert not [w for w in caught if issubclass(w.category, StalePartialWarning)]
        assert (live / "pytorch_model-00001-of-00002.bin").read_bytes() == b"being written"
        assert run_cli(capsys, ["verify", target, "--preset", "tiny"]).code == EXIT_OK
    finally:
        child.kill()
        child.wait()


def test_a_signal_that_surfaces_as_another_error_is_reported_as_the_signal(tmp_path, capsys,
                                                                           monkeypatch):
    """SIGTERM delivered while a C extension initialises (torch's import, say) comes out of
    the import as an ImportError, not as the CLI's own exception: still a stop by SIGTERM,
    exit 143, nothing left behind, not an 'internal error'."""
    from harness.cli import app as cli
    from harness.synth import builder as synth

    def interrupted_import(*_args, **_kwargs):
        try:
            cli._raise_terminated(signal.SIGTERM, None)
        except cli.Terminated:
            raise ImportError("initialization failed") from None

    monkeypatch.setattr(synth, "write_tensors", interrupted_import)
    ran = run_cli(capsys, ["build", "--preset", "tiny", "-o", tmp_path / "built"])
    assert ran.code == EXIT_SIGTERM and "SIGTERM" in ran.err, ran.err
    assert "internal error" not in ran.err
    assert not list(tmp_path.iterdir())


# --- 9. config.json values: every field the contract reads, for every command -------------------

# Tried in order; a field's variant is the first its schema refuses (harness/llava/fields.py).
_BAD_VALUES = ("x", -7, 0, 2.5, True, [1], {"a": 1}, 2**40, 10**400)
CONFIG_COMMANDS = WITH_LOAD + ("check",)


def _malformed_variants() -> list[tuple[str, dict]]:
    from harness.llava.fields import LANGUAGE_MODEL, LLAVA

    out = []
    for name, spec in {**LANGUAGE_MODEL, **LLAVA}.items():
        value = next(v for v in _BAD_VALUES if spec.check(v) is not None)
        out.append((name, {name: value}))
    return out + [
        ("rope_theta", {"rope_theta": float("nan")}),
        ("rope_scaling", {"rope_scaling": {"type": "bogus", "factor": 2.0}}),
        ("architectures", {"architectures": "LlavaLlamaForCausalLM"}),
        ("num_key_value_heads", {"num_key_value_heads": 3}),
        ("hidden_size", {"hidden_size": 65}),
        ("mm_projector_type", {"mm_projector_type": "identity"}),
        ("image_grid_pinpoints", {"image_aspect_ratio": "anyres"}),
        ("image_grid_pinpoints", {"image_aspect_ratio": "anyres", "image_grid_pinpoints": "[["}),
        ("hidden_act", {"hidden_act": "swiglu"}),
    ]


def _variant_id(variant: tuple[str, dict]) -> str:
    field, fields = variant
    return "+".join(f"{k}={json.dumps(v)[:20]}" for k, v in fields.items())


@pytest.mark.parametrize("variant", _malformed_variants(), ids=_variant_id)
def test_a_malformed_config_value_is_one_line_for_every_command(make_ckpt, adapter, tmp_path,
                                                                capsys, variant):
    """No command ends in an internal error on a config value the contract refuses: each that
    reads config.json stops with exit 2 and one line naming the field; `check` reports it as a
    finding (exit 1); extract, which needs no config, copies the projector."""
    field, fields = variant
    ck = make_ckpt("bin")
    config = json.loads((ck.folder / "config.json").read_text())
    config.update(fields)
    (ck.folder / "config.json").write_text(json.dumps(config))
    before = tree_state(ck.folder)
    for command in CONFIG_COMMANDS:
        work = tmp_path / command
        work.mkdir()
        argv = ["check", ck.folder] if command == "check" else \
            command_argv(command, ck, work, adapter)
        ran = run_cli(capsys, argv)
        assert "internal error" not in ran.err, f"{command}: {ran.err}"
        if command == "extract":
            assert ran.code == EXIT_OK, ran.err
        elif command in ("check", "verify"):  # a finding, or a difference from the spec
            assert ran.code == 1 and any(k in ran.out + ran.err for k in fields), \
                f"{command}: {ran.out}{ran.err}"
        else:
            assert_one_error_line(ran, field)
            assert list(work.iterdir()) == [], command
    assert tree_state(ck.folder) == before


def test_a_config_claiming_a_huge_model_is_refused_before_any_work(make_ckpt, adapter, tmp_path,
                                                                   capsys):
    """A config that claims a 100,000x MLP over a tiny folder: load and merge-lora used to build
    it (past a minute, ~2 GB); now the claim is held to the bytes on disk first."""
    ck = make_ckpt("bin")
    config = json.loads((ck.folder / "config.json").read_text())
    config["intermediate_size"] *= 100_000
    (ck.folder / "config.json").write_text(json.dumps(config))
    for command in ("load", "merge-lora"):
        work = tmp_path / command
        work.mkdir()
        ran = run_cli(capsys, command_argv(command, ck, work, adapter))
        err = assert_one_error_line(ran, "config.json")
        assert "claims a" in err and "bytes of tensors" in err, err


def test_an_index_of_a_huge_number_of_tensors_is_refused_before_reading_them(make_ckpt, adapter,
                                                                             tmp_path, capsys):
    """An index listing 200,000 tensors (a million kept `load` busy past a minute at 1.5 GB) is
    refused from its count, before any shard header is scanned."""
    ck = make_ckpt("bin")
    index = ck.read_index()
    shard = SHARDS["bin"][1]
    index["weight_map"].update({f"model.extra.{i}.weight": shard for i in range(200_000)})
    ck.write_index(index)
    for command in ("load", "merge-lora"):
        work = tmp_path / command
        work.mkdir()
        err = assert_one_error_line(run_cli(capsys, command_argv(command, ck, work, adapter)),
                                    "lists 200,027 tensors")
        assert "at most" in err, err


def test_an_adapter_config_of_another_vocabulary_than_its_base_is_refused(make_ckpt, adapter,
                                                                          tmp_path, capsys):
    """The adapter folder's config.json says 515 rows over a 512-row base: load ended in an
    internal error, merge-lora wrote a config of 515 rows over 512-row tensors."""
    ck = make_ckpt("bin")
    lora = shutil.copytree(adapter, tmp_path / "llava-lora")
    config = json.loads((ck.folder / "config.json").read_text())
    config["vocab_size"] = 515
    (lora / "config.json").write_text(json.dumps(config))
    for argv in (["load", lora, "--base", ck.folder, "--device", "cpu", "--dtype", "float32"],
                 ["merge-lora", "--adapter", lora, "--base", ck.folder, "-o", tmp_path / "m"]):
        err = assert_one_error_line(run_cli(capsys, argv), "model.embed_tokens.weight")
        assert "[515, 64]" in err and "[512, 64]" in err, err
    assert not (tmp_path / "m").exists()
