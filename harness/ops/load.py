"""`load_pretrained_model`: the original's signature and return, every load path, stricter.

Paths (chosen from the folder's files; the original's name rule is available with
`detect="name"`):
  llava                full LLaVA checkpoint
  lora                 LoRA adapter + non_lora_trainables.bin on top of a base LLaVA/LM folder
  projector            mm_projector.bin on top of a base
  language_model       plain Llama/Mistral (no vision)
  language_model_lora  plain LM LoRA on top of a base

Where the original fails users, this does better, keeping its results otherwise:
- every projector key must end up loaded from a file (the original's strict=False keeps a random
  projector when keys don't match), and the projector type the keys imply must match the config;
- the language model must load with no missing key (transformers would initialise it randomly);
- dtype is the caller's (`dtype=`/`torch_dtype=`; float16 by default, as the original);
- 4-bit / 8-bit keep the projector, lm_head and the vision tower unquantized (LLaVA #433).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from ..checkpoint.paths import check_side_files, inside
from ..checkpoint.quantized import UNQUANTIZED_MODULES, quantized_linears, scheme_of
from ..checkpoint.reader import open_folder, read_file
from ..errors import HarnessError
from ..llava import keys
from ..llava.adapter import empty_adapter, llava_trainable_keys
from ..llava.claims import check_folder_claims
from ..llava.keys import IMAGE_NEWLINE, PROJECTOR_MARK, PROJECTOR_PREFIX
from ..llava.kinds import NON_LORA_TRAINABLES, PROJECTOR_FILES, detect_kind, kind_from_name
from ..llava.projector import projector_type_from_shapes
from ..llava.tensors import check_config_fits
from ..model.config import architecture_of, llava_config, read_config_json
from ..model.llava import MODEL_CLASSES
from ..model.projector import projector_type_of_config
from .adapter import ADAPTER_FILES, unapplied_adapter_problems

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MULTIMODAL_PREFIXES = (PROJECTOR_PREFIX, IMAGE_NEWLINE)
DEFAULT_CONTEXT_LEN = 2048


class LoadError(HarnessError):
    pass


class LoadWarning(UserWarning):
    pass


@dataclass
class Loaded:
    kind: str
    arch: str | None
    model: torch.nn.Module
    tokenizer: object
    image_processor: object | None
    context_len: int
    dtype: torch.dtype
    quantization: str | None
    load_s: float
    notes: list[str] = field(default_factory=list)


def as_dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value in DTYPES:
        return DTYPES[value]
    raise LoadError(f"dtype {value!r}: expected one of {', '.join(DTYPES)}")


def quantization_config(load_8bit: bool, load_4bit: bool, compute_dtype: torch.dtype):
    """The original's BitsAndBytesConfig (NF4, double quant, float16 compute for 4-bit), with
    the projector and lm_head left unquantized. The vision tower is loaded separately and is
    never quantized."""
    if not (load_8bit or load_4bit):
        return None

    skip = list(UNQUANTIZED_MODULES)  # `_check_unquantized` verifies the result
    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                              llm_int8_skip_modules=skip)


def _check_unquantized(model) -> None:
    """The projector must stay plain float modules whatever the quantization: a quantized
    projector breaks loading a projector or LoRA on top (LLaVA #433)."""
    projector = getattr(model.get_model(), "mm_projector", None)
    if projector is None:
        return
    for name, module in projector.named_modules():
        if type(module).__module__.startswith("bitsandbytes"):
            raise LoadError(f"mm_projector.{name} was quantized ({type(module).__name__}); "
                            "it must stay unquantized")


def _check_folder(path: Path, data: dict) -> None:
    """Every record of every shard validated, and the index checked against them, before
    transformers (torch) maps a byte: a truncated, inflated or deflated record, a lying header
    or an index naming a missing file is one clear line here, never zeros or garbage there.
    First, from the index alone, the config `data` the model will be built from must fit the
    folder: work stays bounded by the files, whatever a config claims."""
    folder = open_folder(path)
    check_folder_claims(folder, data, path / "config.json")
    folder.check()
    check_config_fits(data, folder.tensors, path, LoadError)
    check_side_files(path)


def _checkpoint_projector_shapes(path: Path) -> dict[str, tuple]:
    folder = open_folder(path)
    prefix = MULTIMODAL_PREFIXES[0]
    return {k[len(prefix):]: tuple(m.shape) for k, m in folder.tensors.items()
            if k.startswith(prefix)}


def _check_projector_type(config, shapes: dict[str, tuple], source: Path) -> None:
    configured = projector_type_of_config(config)
    inferred = projector_type_from_shapes(shapes)
    if inferred != configured:
        raise LoadError(f"{source}: projector tensors are {inferred} ({', '.join(sorted(shapes))})"
                        f" but config.json says mm_projector_type {configured!r}")


def _from_pretrained(cls, folder: Path, config, opts: dict):
    model, info = cls.from_pretrained(folder, config=config, output_loading_info=True, **opts)
    return model, set(info.get("missing_keys") or ())


def _require_loaded(missing: set[str], folder: Path, allowed: tuple[str, ...] = ()) -> None:
    bad = sorted(k for k in missing if not k.startswith(allowed)) if allowed else sorted(missing)
    if bad:
        raise LoadError(f"{folder}: checkpoint lacks {len(bad)} tensor(s) the model needs, "
                        f"e.g. {bad[0]} (they would be random)")


def _expected_multimodal(model) -> set[str]:
    return {k for k in model.state_dict() if k.startswith(MULTIMODAL_PREFIXES)}


def normalise_trainable_keys(weights: dict, model_keys: set[str], source: Path) -> dict:
    """Map `non_lora_trainables` / `mm_projector.bin` keys onto model keys.

    The original strips `base_model.` then, when keys start `model.model.`, one `model.`; a
    key that still names no model tensor is silently skipped there. Here bare keys (e.g.
    `mm_projector.0.weight`) get `model.` prepended, and a key that still matches nothing is an
    error naming it.
    """
    out = {}
    # LLaVA's saver writes peft-wrapped names for biases (`q_proj.base_layer.bias`).
    stripped = {k.replace(".base_layer.", "."): weights[v]
                for k, v in llava_trainable_keys(weights).items()}
    for key, value in stripped.items():
        target = key if key in model_keys else f"model.{key}"
        if target not in model_keys:
            raise LoadError(f"{source}: key {key!r} matches no tensor of the model")
        out[target] = value
    return out


def _load_extra(model, path: Path, source_keys: dict) -> set[str]:
    """Copy normalised extra tensors (projector, trainables) into the model, cast to each
    target's dtype; return the keys loaded."""
    state = model.state_dict()
    for key, value in source_keys.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise LoadError(f"{path}: {key} has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(state[key].shape)}")
    with torch.no_grad():
        for key, value in source_keys.items():
            state[key].copy_(value.to(device=state[key].device, dtype=state[key].dtype))
    return set(source_keys)


def _read_weights(path: Path) -> dict:
    return read_file(path)


@dataclass
class _Options:
    dtype: torch.dtype
    quant: object | None
    device: str
    device_map: object
    vision_tower: Path | None
    tower_dtype: torch.dtype | None  # None: the original's rule (_tower_dtype)
    device_map_arg: object  # the caller's device_map, which that rule reads
    hf_kwargs: dict

    def model_kwargs(self) -> dict:
        opts = {"dtype": self.dtype, "device_map": self.device_map, **self.hf_kwargs}
        if self.quant is not None:
            opts["quantization_config"] = self.quant
        return opts


def _tokenizer(folder: Path):
    check_side_files(folder)
    try:
        with warnings.catch_warnings():
            # It reads config.json too, and transformers 5 warns about the published
            # `rope_scaling: null`; the tokenizer does not use it.
            warnings.filterwarnings("ignore", message=".*rope_scaling", category=FutureWarning)
            return AutoTokenizer.from_pretrained(folder, use_fast=False)
    except (OSError, ValueError) as exc:
        raise LoadError(f"{folder}: no usable tokenizer: {str(exc).splitlines()[0]}") from None


def _load_llava_full(path: Path, base: Path | None, opts: _Options):
    data = read_config_json(path)
    _check_folder(path, data)
    arch, config = llava_config(path, data)
    _check_projector_type(config, _checkpoint_projector_shapes(path), path)
    model, missing = _from_pretrained(MODEL_CLASSES[arch], path, config, opts.model_kwargs())
    _require_loaded(missing, path)
    return arch, model, _tokenizer(path)


def _load_base_for(path: Path, base: Path | None, opts: _Options, kind: str):
    """The base model built with the adapter/projector folder's config; its multimodal
    tensors may be missing (a plain Vicuna base) as long as something supplies them later."""
    if base is None:
        raise LoadError(f"{path}: a {kind} folder needs a base model (--base / model_base)")
    data = read_config_json(path)
    _check_folder(base, data)
    # A QLoRA run saves its quantization_config into config.json; the base is not quantized
    # unless asked for here (and a stale one makes transformers misread the weights).
    data.pop("quantization_config", None)
    arch, config = llava_config(path, data)
    model, missing = _from_pretrained(MODEL_CLASSES[arch], base, config, opts.model_kwargs())
    _require_loaded(missing, base, allowed=MULTIMODAL_PREFIXES)
    return arch, config, model, missing


def _require_multimodal(model, missing: set[str], supplied: set[str], path: Path) -> None:
    unloaded = sorted((_expected_multimodal(model) & missing) - supplied)
    if unloaded:
        raise LoadError(f"{path}: {unloaded[0]} is in neither the base nor this folder; the "
                        "projector would stay random")


def _load_projector_only(path: Path, base: Path | None, opts: _Options):
    arch, config, model, missing = _load_base_for(path, base, opts, "projector-only")
    file = next(p for p in (inside(path, n, must_exist=False) for n in PROJECTOR_FILES) if p)
    raw = _read_weights(file)
    # The type check comes first: keys of another projector type would otherwise surface as
    # "matches no tensor", which hides the real fault.
    _check_projector_type(config, {k.split(PROJECTOR_MARK, 1)[1]: tuple(v.shape)
                                   for k, v in raw.items() if PROJECTOR_MARK in k}, file)
    weights = normalise_trainable_keys(raw, set(model.state_dict()), file)
    prefix = MULTIMODAL_PREFIXES[0]
    expected = {k for k in _expected_multimodal(model) if k.startswith(prefix)}
    if set(weights) & expected != expected:
        lacking = sorted(expected - set(weights))
        raise LoadError(f"{file}: lacks projector tensor {lacking[0]}")
    supplied = _load_extra(model, file, weights)
    _require_multimodal(model, missing, supplied, path)
    return arch, model, _tokenizer(base)


def _apply_adapter(model, path: Path):
    """PeftModel + merge, strictly: every adapter tensor must land on a module (peft drops the
    others without a word; a zero vision-tower LoRA, which LLaVA training leaves behind, is
    inert and allowed), and a merge that puts NaN/inf in a weight is refused (checked after
    the plain merge: peft's `safe_merge` rounds half precision differently)."""
    from peft import PeftModel  # heavy: peft

    for name in ADAPTER_FILES:  # validated before peft's own reader maps it
        found = inside(path, name, must_exist=False)
        if found is not None:
            empty = empty_adapter(read_file(found))
            if empty:
                raise LoadError(f"{found}: {empty}: the adapter changes nothing (saved "
                                "without its parameters gathered?)")
    model = PeftModel.from_pretrained(model, path)
    problems = unapplied_adapter_problems(model, path)
    if problems:
        raise LoadError(problems[0])
    merged = model.merge_and_unload()
    for name, param in merged.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise LoadError(f"{path}: merging the adapter gives non-finite values in {name}")
    return merged


def _load_lora(path: Path, base: Path | None, opts: _Options):
    arch, _config, model, missing = _load_base_for(path, base, opts, "LoRA")
    supplied: set[str] = set()
    trainables = inside(path, NON_LORA_TRAINABLES, must_exist=False)
    if trainables is not None:
        weights = normalise_trainable_keys(read_file(trainables, "bin"), set(model.state_dict()),
                                           trainables)
        supplied = _load_extra(model, trainables, weights)
    _require_multimodal(model, missing, supplied, path)
    return arch, _apply_adapter(model, path), _tokenizer(base)


def _load_language_model(path: Path, base: Path | None, opts: _Options):
    folder = path if base is None else base
    data = read_config_json(folder)
    _check_folder(folder, data)
    arch = architecture_of(data, folder / "config.json")
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True,
                                                       **opts.model_kwargs())
    _require_loaded(set(info.get("missing_keys") or ()), folder)
    if base is not None:
        model = _apply_adapter(model, path)
        if opts.quant is None:
            model = model.to(opts.dtype)
    return arch, model, _tokenizer(folder)


_LOADERS = {"llava": _load_llava_full, "projector": _load_projector_only, "lora": _load_lora,
            "language_model": _load_language_model, "language_model_lora": _load_language_model}


def _finish_llava(model, tokenizer, opts: _Options):
    """Image tokens and the vision tower, as the original does after any LLaVA path."""
    if getattr(model.config, "mm_use_im_patch_token", True):
        tokenizer.add_tokens(["<im_patch>"], special_tokens=True)
    if getattr(model.config, "mm_use_im_start_end", False):
        tokenizer.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    if len(tokenizer) != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    tower = model.get_vision_tower()
    tower.load_model(opts.vision_tower, dtype=_tower_dtype(opts, model.config),
                     device=model.device)
    return tower.image_processor


def _load_stored_tower(model, folder: Path) -> bool:
    """LLaVA-1.6 tunes the tower and stores it in the checkpoint. With
    `unfreeze_mm_vision_tower` the original builds the tower from its folder at init, so
    `from_pretrained` then loads the stored tensors over it: the stored tower is the one that
    runs. Same here, strictly: the stored tensors must be exactly the tower's. Returns whether
    a stored tower was loaded."""
    checkpoint = open_folder(folder)
    if not keys.runs_stored_tower(model.config, checkpoint.tensors):
        return False
    stored = [k for k in checkpoint.tensors if k.startswith(keys.STORED_TOWER)]
    clip = model.get_vision_tower().vision_tower
    state = clip.state_dict()
    names = {k: k.removeprefix(keys.STORED_TOWER) for k in stored}
    unknown = sorted(k for k, name in names.items() if name not in state)
    if unknown:
        raise LoadError(f"{folder}: {unknown[0]} is no tensor of the vision tower "
                        f"({model.get_vision_tower().tower_path})")
    lacking = sorted(set(state) - set(names.values()))
    if lacking:
        raise LoadError(f"{folder}: stores a vision tower without {keys.STORED_TOWER}"
                        f"{lacking[0]}")
    weights = checkpoint.read(stored)
    with torch.no_grad():
        for key, name in names.items():
            if tuple(weights[key].shape) != tuple(state[name].shape):
                raise LoadError(f"{folder}: {key} has shape {tuple(weights[key].shape)}, the "
                                f"tower expects {tuple(state[name].shape)}")
            state[name].copy_(weights[key].to(dtype=state[name].dtype))
    return True


def _tower_dtype(opts: _Options, config) -> torch.dtype:
    """The original loads CLIP in float32 and casts it to float16 only when the caller passes
    a device_map other than "auto" (its default, also on CPU): so by default the tower runs in
    float32 whatever the model's dtype. Same rule here, the cast going to the load dtype.
    With `unfreeze_mm_vision_tower` (LLaVA-1.6) the original builds the tower inside the
    model's `from_pretrained`, so it takes the load dtype."""
    if opts.tower_dtype is not None:
        return opts.tower_dtype
    if getattr(config, "unfreeze_mm_vision_tower", False):
        return opts.dtype
    return torch.float32 if opts.device_map_arg == "auto" else opts.dtype


def _choose_kind(model_path: Path, model_base, model_name: str, detect: str) -> tuple[str, list]:
    notes = []
    by_name = kind_from_name(model_name, model_base)
    if detect == "name":
        return by_name, notes
    if detect != "files":
        raise LoadError(f"detect {detect!r}: expected 'files' or 'name'")
    found = detect_kind(model_path)
    if found.kind == "llava-hf":
        raise LoadError(f"{model_path}: a llava-hf folder ({found.reason}); load it with "
                        "transformers' LlavaForConditionalGeneration, or convert it first: "
                        f"llava-harness convert {model_path} -o OUT --to original")
    if found.kind != by_name:
        note = (f"{model_path}: the name {model_name!r} means {by_name!r} to the original loader,"
                f" but the files say {found.kind!r} ({found.reason}); loading as {found.kind!r}")
        warnings.warn(note, LoadWarning, stacklevel=3)
        notes.append(note)
    return found.kind, notes


def _prequantized(path: Path, kind: str, quantize: bool) -> str | None:
    """The scheme of a pre-quantized LLaVA folder (its config.json's quantization_config,
    which transformers then loads it with), its stored layout validated first; None for a
    float folder."""
    if kind != "llava":
        return None
    scheme = scheme_of(read_config_json(path), path / "config.json")
    if scheme is None:
        return None
    quantized_linears(scheme, open_folder(path).tensors, path)
    if scheme.method != "bitsandbytes":
        raise LoadError(f"{path}: a {scheme.name} checkpoint; running it needs {scheme.method}"
                        " kernels (optimum with auto-gptq / autoawq), which the harness does "
                        "not install: count, verify, extract and strip read it")
    if quantize:
        raise LoadError(f"{path}: already quantized ({scheme.name}, from config.json's "
                        "quantization_config); load it without --4bit/--8bit")
    return scheme.name


def load(model_path, model_base=None, model_name: str | None = None, *, load_8bit=False,
         load_4bit=False, device_map="auto", device="cuda", use_flash_attn=False,
         dtype=None, detect="files", vision_tower=None, vision_tower_dtype=None,
         **kwargs) -> Loaded:
    """Load any LLaVA folder; see the module docstring. Returns everything the CLI reports."""
    start = time.perf_counter()
    path = Path(model_path)
    base = Path(model_base) if model_base is not None else None
    kind, notes = _choose_kind(path, base, model_name or path.name, detect)
    if load_8bit and load_4bit:
        raise LoadError("choose one of load_8bit and load_4bit")
    prequantized = _prequantized(path, kind, load_8bit or load_4bit)
    dtype = as_dtype(dtype or kwargs.pop("torch_dtype", None) or torch.float16)
    kwargs.pop("torch_dtype", None)
    if use_flash_attn:
        kwargs["attn_implementation"] = "flash_attention_2"
    opts = _Options(dtype=dtype, quant=quantization_config(load_8bit, load_4bit, dtype),
                    device=device, device_map=device_map if device == "cuda" else {"": device},
                    vision_tower=Path(vision_tower) if vision_tower else None,
                    tower_dtype=as_dtype(vision_tower_dtype) if vision_tower_dtype is not None
                    else None, device_map_arg=device_map,
                    hf_kwargs=kwargs)
    arch, model, tokenizer = _LOADERS[kind](path, base, opts)
    processor = None
    if kind in ("llava", "lora", "projector"):
        _check_unquantized(model)
        processor = _finish_llava(model, tokenizer, opts)
        weights = path if kind == "llava" else base  # the folder the model's weights came from
        if _load_stored_tower(model, weights):
            notes.append(f"{weights}: unfreeze_mm_vision_tower: the vision tower stored in the "
                         "checkpoint replaces the one in its folder, as the original loads it")
    model.eval()
    context_len = getattr(model.config, "max_sequence_length", None) or DEFAULT_CONTEXT_LEN
    quant = "int8" if load_8bit else "nf4-dq" if load_4bit else prequantized
    return Loaded(kind, arch, model, tokenizer, processor, context_len, dtype, quant,
                  time.perf_counter() - start, notes)


def load_pretrained_model(model_path, model_base, model_name, load_8bit=False, load_4bit=False,
                          device_map="auto", device="cuda", use_flash_attn=False, **kwargs):
    """The original's signature and return: (tokenizer, model, image_processor, context_len).
    Extra keywords: `dtype`/`torch_dtype`, `detect` ('files' or 'name'), `vision_tower`
    (a local CLIP folder overriding the config's `mm_vision_tower`), `vision_tower_dtype`
    (default as the original: float32 under device_map="auto", else the load dtype; the load
    dtype for a tower built with the model, `unfreeze_mm_vision_tower`)."""
    loaded = load(model_path, model_base, model_name, load_8bit=load_8bit, load_4bit=load_4bit,
                  device_map=device_map, device=device, use_flash_attn=use_flash_attn, **kwargs)
    return loaded.tokenizer, loaded.model, loaded.image_processor, loaded.context_len
