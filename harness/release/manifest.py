"""A release manifest: the artifacts of one release and how each was made from the others.

```toml
# release.toml (paths relative to this file)
[artifacts]
base = "vicuna-7b"             # the language model, or a LLaVA checkpoint, the LoRA was trained on
adapter = "llava-lora"         # LLaVA's LoRA folder (adapter + non_lora_trainables.bin)
merged = "llava-v1.5-7b"       # what the release ships
hf = "llava-1.5-7b-hf"
llama = "vicuna-7b-from-llava"
nf4 = "llava-v1.5-7b-nf4"
projector = "mm_projector.bin"
pretrain = "stage1/mm_projector.bin"

[made]
merged = "merge(base, adapter)"
hf = "convert(merged)"
llama = "strip(merged)"
nf4 = "quantize(merged, nf4-dq)"
projector = "extract(merged)"
pretrain = "stage1(merged)"    # the projector stage 2 started from: a distance, not a verdict
```

Only the kinds the contract knows (harness/llava/kinds.py); every artifact is resolved inside
the manifest's folder or given as an absolute path, and each relation's inputs and output must
be of the kinds its operation takes and makes.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import HarnessError

MAX_MANIFEST_BYTES = 1 << 20
# operation -> (number of artifact inputs, whether it takes a word argument)
OPERATIONS = {"merge": (2, False), "convert": (1, False), "strip": (1, False),
              "quantize": (1, True), "extract": (1, False), "stage1": (1, False)}
QUANT_SCHEMES = ("nf4", "nf4-dq", "fp4", "int8")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_MADE = re.compile(r"^\s*(\w+)\s*\(\s*([^()]*?)\s*\)\s*$")


class ManifestError(HarnessError):
    """A release manifest that cannot be read or does not make sense (exit 2)."""


@dataclass(frozen=True)
class Relation:
    target: str                  # the artifact made
    op: str                      # merge, convert, strip, quantize, extract, stage1
    sources: tuple[str, ...]     # the artifacts it was made from
    arg: str | None = None       # quantize's scheme

    def __str__(self) -> str:
        args = ", ".join(self.sources + ((self.arg,) if self.arg else ()))
        return f"{self.target} = {self.op}({args})"


@dataclass(frozen=True)
class Manifest:
    path: Path
    artifacts: dict[str, Path]
    relations: tuple[Relation, ...]


def _read(path: Path) -> dict:
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path}: {size} bytes, over the {MAX_MANIFEST_BYTES} byte limit "
                                "for a manifest")
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot be read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: not TOML ({exc})") from None


def _artifacts(path: Path, data: dict) -> dict[str, Path]:
    table = data.get("artifacts")
    if not isinstance(table, dict) or not table:
        raise ManifestError(f"{path}: [artifacts] is missing or empty (name = \"folder\")")
    out = {}
    for name, where in table.items():
        if not _NAME.match(name) or not isinstance(where, str) or not where:
            raise ManifestError(f"{path}: [artifacts] {name} = {where!r}: a name and a folder "
                                "(or file) path expected")
        found = (path.parent / where).resolve() if not Path(where).is_absolute() \
            else Path(where)
        if not found.exists():
            raise ManifestError(f"{path}: artifact {name} = {where!r}: {found} does not exist")
        out[name] = found
    return out


def parse_made(text, target: str, where: Path) -> Relation:
    """`merge(base, adapter)` -> Relation(target, "merge", ("base", "adapter"))."""
    match = _MADE.match(text) if isinstance(text, str) else None
    if match is None or match.group(1) not in OPERATIONS:
        raise ManifestError(f"{where}: [made] {target} = {text!r}: expected one of "
                            f"{', '.join(f'{op}(...)' for op in OPERATIONS)}")
    op = match.group(1)
    args = [a.strip().strip("'\"") for a in match.group(2).split(",") if a.strip()]
    count, takes_word = OPERATIONS[op]
    if len(args) != count + takes_word:
        raise ManifestError(f"{where}: [made] {target} = {text!r}: {op} takes {count} "
                            f"artifact(s){' and a scheme' if takes_word else ''}")
    arg = args.pop() if takes_word else None
    if op == "quantize" and arg not in QUANT_SCHEMES:
        raise ManifestError(f"{where}: [made] {target} = {text!r}: scheme {arg!r}, expected one "
                            f"of {', '.join(QUANT_SCHEMES)}")
    return Relation(target, op, tuple(args), arg)


def read_manifest(path: Path) -> Manifest:
    """A manifest, every artifact present and every relation naming known artifacts."""
    path = Path(path)
    data = _read(path)
    artifacts = _artifacts(path, data)
    made = data.get("made")
    if not isinstance(made, dict) or not made:
        raise ManifestError(f"{path}: [made] is missing or empty (artifact = \"op(inputs)\")")
    relations = []
    for target, text in made.items():
        relation = parse_made(text, target, path)
        unknown = [n for n in (target, *relation.sources) if n not in artifacts]
        if unknown:
            raise ManifestError(f"{path}: [made] {target}: {unknown[0]!r} is not in [artifacts]")
        if target in relation.sources:
            raise ManifestError(f"{path}: [made] {target} is made from itself")
        relations.append(relation)
    extra = sorted(set(data) - {"artifacts", "made"})
    if extra:
        raise ManifestError(f"{path}: unknown table [{extra[0]}] (a manifest has [artifacts] "
                            "and [made])")
    return Manifest(path, artifacts, tuple(relations))
