"""Llama-2 backbone stripping: a LLaVA checkpoint (original or llava-hf layout) -> a plain
Llama/Mistral folder that `LlamaForCausalLM` / `MistralForCausalLM.from_pretrained` loads.

Which tensors go is decided by one declarative key map (harness/llava/keys.py): the projector, vision
tower, resampler and image_newline always, the legacy `rotary_emb.inv_freq` buffers unless
asked to keep them. The shards are rewritten by the checkpoint layer's streaming machinery
(harness/checkpoint/shards.py): never a shard in memory, never torch, a shard with nothing to
drop hard-linked. The result is validated strictly (key set, shapes and dtypes against the
target class on the meta device) before the atomic output folder appears; building that class
(transformers' import, ~2 s) runs in a thread while the shards are copied.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..checkpoint.atomic import atomic_dir
from ..checkpoint.files import copy_files
from ..checkpoint.formats import shape_numel
from ..checkpoint.paths import check_output
from ..checkpoint.quantized import (Scheme, logical_shapes, quantized_linears, scheme_of, split_key,
                                    stored_layout)
from ..checkpoint.reader import CheckpointError, scan_folder
from ..checkpoint.shards import plan_shards, write_shards
from ..checkpoint.tensors import Source
from ..data import cache_root
from ..errors import HarnessError
from ..llava import keys
from ..llava.config import architecture_of, is_llava_field, read_config
from ..llava.kinds import LM_SIDE_FILES

__all__ = ["LM_AUX_FILES", "StripError", "StripResult", "parameter_count", "scan_folder",
           "strict_problems", "strip"]

# Files beside the weights that a plain language-model folder keeps.
LM_AUX_FILES = LM_SIDE_FILES


class StripError(HarnessError):
    """A checkpoint that cannot be stripped, or a stripped result that fails validation."""


# --- the strip operation ------------------------------------------------------------------------

PLAIN_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


def arch_of(config: dict, layout: str, where: Path) -> str:
    if layout == "hf":
        arch = (config.get("text_config") or {}).get("model_type")
        if arch not in PLAIN_CLASSES:
            raise StripError(f"{where}: text_config.model_type {arch!r} is not llama or mistral")
        return arch
    return architecture_of(config, where)


def plain_config(config: dict, layout: str, arch: str) -> dict:
    """The language model's config.json: LLaVA fields out, Llama/Mistral identity in."""
    if layout == "hf":
        fields = dict(config["text_config"])
        for name in ("torch_dtype", "dtype", "transformers_version", "quantization_config"):
            if name in config and name not in fields:
                fields[name] = config[name]
    else:
        # `_name_or_path` names the LLaVA model, which this no longer is.
        fields = {k: v for k, v in config.items()
                  if not is_llava_field(k) and k != "_name_or_path"}
    fields.update(model_type=arch, architectures=[PLAIN_CLASSES[arch]])
    return dict(sorted(fields.items()))


@dataclass
class StripResult:
    out: Path
    layout: str
    arch: str
    format: str
    kept: int
    dropped: list[str]
    shards: dict[str, str]
    files: list[str]
    total_size: int
    verified: bool


def strip_mapper(layout: str, keep_legacy_buffers: bool, folder: Path,
                 dropped: list[str], scheme: Scheme | None = None):
    """layout -> canonical -> plain; appends every dropped source key to `dropped`. In a
    pre-quantized checkpoint a linear's stored tensors (`weight.absmax`, `SCB`, `qweight`, ...)
    go where its `weight` goes: the key map names float weights, the suffix rides along."""
    to_canonical = keys.LAYOUT_MAPS[layout]

    def plain(key: str, where: str) -> str | None:
        return keys.PLAIN(to_canonical(key, where=where), where=where)

    def target_of(key: str, where: str) -> str | None:
        split = split_key(scheme, key) if scheme is not None else None
        if split is None or split[1] == "weight":
            return plain(key, where)
        module, suffix = split
        weight = plain(module + ".weight", where)
        return None if weight is None else weight.removesuffix("weight") + suffix

    def mapper(file: str, source: Source) -> Source | None:
        target = target_of(source.key, str(folder / file))
        if target is None or (keys.is_legacy_buffer(target) and not keep_legacy_buffers):
            dropped.append(source.key)
            return None
        return source if target == source.key else source.renamed(target)

    return mapper


def strip(ckpt: Path, out: Path, *, keep_legacy_buffers: bool = False,
          to_format: str | None = None, force: bool = False, verify: bool = True) -> StripResult:
    """Write the plain language model of the LLaVA checkpoint at `ckpt` to `out`."""
    check_output(Path(out), [Path(ckpt)])
    scanned = scan_folder(Path(ckpt), total_size=False)  # checked once the keys are known
    folder = scanned.folder
    config = read_config(folder.path)
    layout = keys.layout_of(config, scanned.tensors, where=str(folder.path))
    arch = arch_of(config, layout, folder.path / "config.json")
    scheme = scheme_of(config, folder.path / "config.json")
    if scheme is not None:
        # Every packed weight with all of its state, every shape as its logical shape implies:
        # a broken quantized linear is refused here, not written out.
        quantized_linears(scheme, scanned.tensors, folder.path)
    fmt = to_format or folder.format
    dropped: list[str] = []
    shards = plan_shards(scanned, strip_mapper(layout, keep_legacy_buffers, folder.path,
                                               dropped, scheme), fmt)
    if not shards:
        raise StripError(f"{folder.path}: no language-model tensor left after stripping")
    folder.check()
    with atomic_dir(Path(out), force) as tmp, ThreadPoolExecutor(1) as pool:
        (tmp / "config.json").write_text(json.dumps(plain_config(config, layout, arch),
                                                    indent=2, sort_keys=True) + "\n")
        # The target class on the meta device, built while the shards are copied.
        expected = pool.submit(expected_state, tmp) if verify else None
        done = write_shards(tmp, shards, fmt, indexed=folder.index_file is not None)
        files = copy_files(folder.path, tmp, LM_AUX_FILES)
        if verify:
            problems = strict_problems(tmp, allow_legacy=keep_legacy_buffers,
                                       expected=expected.result())
            if problems:
                raise StripError(f"stripped result fails validation ({len(problems)} "
                                 f"problem(s)); first: {problems[0]}")
    return StripResult(Path(out), layout, arch, fmt, sum(len(s.tensors) for s in shards),
                       sorted(dropped), done, files,
                       sum(t.nbytes for s in shards for t in s.tensors), verify)


# --- strict validation ----------------------------------------------------------------------


def config_problems(folder: Path, config: dict) -> list[str]:
    where = folder / "config.json"
    problems = [f"{where}: LLaVA-only field {name!r} is still present"
                for name in sorted(config) if is_llava_field(name)]
    arch = config.get("model_type")
    if arch not in PLAIN_CLASSES:
        problems.append(f"{where}: model_type {arch!r}, expected llama or mistral")
    elif config.get("architectures") != [PLAIN_CLASSES[arch]]:
        problems.append(f"{where}: architectures {config.get('architectures')!r}, expected "
                        f"[{PLAIN_CLASSES[arch]!r}]")
    return problems


def expected_state(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) of the config's own class, instantiated on the meta device.

    Remembered in the cache folder per (config.json, transformers, torch): building the class
    means importing torch and transformers, ~1.2 GB of libraries that a 7B copy has usually
    pushed out of the page cache, so they load from disk while the copy uses it (measured
    here: +8 s on a 21 s copy). The same architecture stripped again checks in milliseconds."""
    cached = _expected_cache(folder)
    if cached is not None and cached.is_file():
        try:
            return {k: (tuple(shape), dtype)
                    for k, (shape, dtype) in json.loads(cached.read_text()).items()}
        except (OSError, ValueError, TypeError):
            pass  # unreadable: rebuild it
    state = _meta_state(folder)
    if cached is not None:
        _remember(cached, state)
    return state


def _expected_cache(folder: Path) -> Path | None:
    try:
        versions = [metadata.version(d) for d in ("transformers", "torch")]
        config = (folder / "config.json").read_bytes()
    except (metadata.PackageNotFoundError, OSError):
        return None
    digest = hashlib.sha256(json.dumps(versions).encode() + b"\0" + config).hexdigest()[:20]
    return cache_root() / "expected-state" / f"{digest}.json"


def _remember(path: Path, state: dict) -> None:
    """Best effort: a read-only cache only costs the next run its import."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump({k: [list(shape), dtype] for k, (shape, dtype) in state.items()}, fh)
        os.replace(tmp, path)
    except OSError:
        pass


def _meta_state(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    import torch  # heavy: torch
    from transformers import AutoConfig, AutoModelForCausalLM  # heavy: transformers

    config = AutoConfig.from_pretrained(folder)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in model.state_dict().items()}


def _legacy_problems(folder: Path, found: dict[str, Source], config: dict) -> list[str]:
    layers = config.get("num_hidden_layers", 0)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    problems = []
    for key, source in sorted(found.items()):
        layer = int(key.split(".")[2])
        if layer >= layers or source.shape != (head_dim // 2,) or source.dtype != "float32":
            problems.append(f"{folder}: legacy buffer {key} is {source.dtype}"
                            f"{list(source.shape)}, expected float32[{head_dim // 2}] for one "
                            f"of {layers} layers")
    return problems


def strict_problems(folder: Path, allow_legacy: bool = False,
                    expected: dict | None = None) -> list[str]:
    """Everything that keeps `folder` from being exactly the plain language model: LLaVA
    config fields, and any key missing, unexpected, or of the wrong shape or dtype against
    the target class's state dict on the meta device. Legacy inv_freq buffers pass only when
    allowed (transformers ignores them; the check does not)."""
    folder = Path(folder)
    try:
        found = scan_folder(folder).tensors
    except CheckpointError as exc:
        return [str(exc)]
    config = json.loads((folder / "config.json").read_text())
    problems = config_problems(folder, config)
    if problems:
        return problems
    expected = expected if expected is not None else expected_state(folder)
    scheme = scheme_of(config, folder / "config.json")
    if scheme is not None:
        try:
            quantized_linears(scheme, found, folder)
        except CheckpointError as exc:
            return [str(exc)]
        expected = quantized_expected(expected, scheme)
    legacy = {k: s for k, s in found.items() if keys.is_legacy_buffer(k)} if allow_legacy else {}
    problems += _legacy_problems(folder, legacy, config)
    for key in sorted(expected.keys() - found.keys()):
        problems.append(f"{folder}: missing {key}")
    for key in sorted(found.keys() - expected.keys() - legacy.keys()):
        problems.append(f"{folder}: unexpected {key}")
    for key in sorted(expected.keys() & found.keys()):
        shape, dtype = expected[key]
        got = found[key]
        if shape is None:  # a quant_state JSON: any length, checked by quantized_linears
            shape = got.shape if len(got.shape) == 1 else (0,)
        if (got.shape, got.dtype) != (shape, dtype):
            problems.append(f"{folder}: {key} is {got.dtype}{list(got.shape)}, the model "
                            f"expects {dtype}{list(shape)}")
    return problems


def quantized_expected(expected: dict, scheme: Scheme) -> dict:
    """The float model's state with every decoder linear's weight replaced by what `scheme`
    stores for it (lm_head, embeddings and norms stay float, as every scheme leaves them)."""
    out = {}
    for key, (shape, dtype) in expected.items():
        if not (key.startswith("model.layers.") and key.endswith("_proj.weight")):
            out[key] = (shape, dtype)
            continue
        module = key.removesuffix(".weight")
        for suffix, stored in stored_layout(scheme, shape[0], shape[1], dtype).items():
            out[f"{module}.{suffix}"] = stored
    return out


def parameter_count(folder: Path) -> int:
    """Parameters from headers alone (legacy buffers are not parameters); a pre-quantized
    folder counts its logical parameters, those of the float model."""
    folder = Path(folder)
    tensors = scan_folder(folder).tensors
    scheme = scheme_of(read_config(folder), folder / "config.json")
    shapes = {k: s.shape for k, s in tensors.items()} if scheme is None else \
        logical_shapes(tensors, quantized_linears(scheme, tensors, folder))
    return sum(shape_numel(shape) for k, shape in shapes.items()
               if not keys.is_legacy_buffer(k))
