"""A LoRA adapter folder as LLaVA's training saves it: peft's `adapter_config.json` and
`adapter_model.safetensors` (or `.bin`), and LLaVA's `non_lora_trainables.bin` (the projector
and whatever else was trained in full).

peft's key layout: `base_model.model.<module>.lora_A.weight` / `lora_B.weight`, DoRA's
`<module>.lora_magnitude_vector`, and for `bias="all"` / `"lora_only"` the trained biases
(`<module>.base_layer.bias` for an adapted layer, `<module>.bias` otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.paths import inside
from ..checkpoint.reader import read_json
from .errors import ConfigError
from .fields import (Field, boolean, field_problems, json_object, nullable, one_of, positive_int,
                     positive_number)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA_TRAINABLES = "non_lora_trainables.bin"
PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = {".lora_A.weight": "a", ".lora_B.weight": "b",
                 ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight":
                 "magnitude"}
# What LLaVA's find_all_linear_names leaves out of the targets on purpose: a LoRA there is a
# training that went around it.
MULTIMODAL_KEYWORDS = ("mm_projector", "vision_tower", "vision_resampler")


def _targets(value) -> str | None:
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str)
                                                                  for v in value)):
        return None
    return "a module name pattern or a list of module names"


def _pattern(value) -> str | None:
    ok = isinstance(value, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                         and v > 0 for v in value.values())
    return None if ok else "an object of positive numbers"


ADAPTER = {
    "peft_type": Field(one_of("LORA"), None, "only LoRA adapters are LLaVA's"),
    "r": Field(positive_int, 8),
    "lora_alpha": Field(positive_number, 8),
    "target_modules": Field(nullable(_targets), None),
    "bias": Field(one_of("none", "all", "lora_only"), "none"),
    "use_rslora": Field(boolean, False),
    "use_dora": Field(boolean, False),
    "fan_in_fan_out": Field(boolean, False),
    "rank_pattern": Field(nullable(_pattern), {}),
    "alpha_pattern": Field(nullable(_pattern), {}),
    "task_type": Field(nullable(one_of("CAUSAL_LM")), None),
    "modules_to_save": Field(nullable(_targets), None),
    "base_model_name_or_path": Field(nullable(lambda v: None if isinstance(v, str)
                                              else "a string"), None),
    "inference_mode": Field(boolean, True),
    "lora_dropout": Field(lambda v: None if isinstance(v, (int, float)) and
                          not isinstance(v, bool) and 0 <= v <= 1 else "a number in [0, 1]", 0.0),
    "layers_to_transform": Field(nullable(lambda v: None), None),
    "layers_pattern": Field(nullable(lambda v: None), None),
    "revision": Field(nullable(lambda v: None), None),
    "auto_mapping": Field(nullable(json_object), None),
}
REQUIRED = ("peft_type", "r", "lora_alpha")


def adapter_config_problems(data, where: str) -> list[str]:
    if not isinstance(data, dict):
        return [f"{where}: expected a JSON object, got {type(data).__name__}"]
    missing = [f"{where}: has no {name}" for name in REQUIRED if name not in data]
    return missing + field_problems(data, ADAPTER, where)


def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json, resolved inside the folder and held to the schema."""
    path = Path(folder) / ADAPTER_CONFIG
    found = inside(Path(folder), ADAPTER_CONFIG, must_exist=False)
    if found is None:
        raise ConfigError(f"{path}: missing; {folder} is not a LoRA adapter folder")
    data = read_json(found, path)
    problems = adapter_config_problems(data, str(path))
    if problems:
        raise ConfigError(problems[0])
    return data


@dataclass
class LoraModule:
    """One adapted module's tensors (adapter file keys)."""

    a: str | None = None
    b: str | None = None
    magnitude: str | None = None


@dataclass
class AdapterKeys:
    """An adapter file's keys, sorted by what they are."""

    modules: dict[str, LoraModule] = field(default_factory=dict)  # target weight -> parts
    biases: dict[str, str] = field(default_factory=dict)          # target bias -> key
    foreign: list[str] = field(default_factory=list)              # no LoRA part, no bias


def adapter_keys(keys) -> AdapterKeys:
    """Sort peft file keys into adapted modules (by the base weight they adapt), trained
    biases, and keys that are neither."""
    out = AdapterKeys()
    for key in keys:
        if not key.startswith(PEFT_PREFIX):
            out.foreign.append(key)
            continue
        rest = key[len(PEFT_PREFIX):]
        kind = next(((s, k) for s, k in LORA_SUFFIXES.items() if rest.endswith(s)), None)
        if kind is not None:
            target = f"{rest[:-len(kind[0])]}.weight"
            setattr(out.modules.setdefault(target, LoraModule()), kind[1], key)
        elif ".lora_" not in rest and rest.endswith(".bias"):
            out.biases[rest.replace(".base_layer.", ".")] = key
        else:
            out.foreign.append(key)
    return out


def empty_adapter(tensors: dict) -> str | None:
    """Why the adapter `tensors` (file key -> tensor or source with `numel`) change nothing at
    all, or None: no LoRA tensor (an adapter saved empty: the 443-byte adapter_model.bin), or
    only empty ones (a ZeRO-3 save without gathering)."""
    modules = adapter_keys(tensors).modules
    if not modules:
        return f"no LoRA tensor ({len(tensors)} tensor(s) in all)"
    halves = [k for m in modules.values() for k in (m.a, m.b) if k]
    if all(_numel(tensors[k]) == 0 for k in halves):
        return f"all {len(modules)} LoRA module(s) hold empty tensors"
    return None


def _numel(tensor) -> int:
    numel = tensor.numel
    return numel() if callable(numel) else numel


def llava_trainable_keys(keys) -> dict[str, str]:
    """`non_lora_trainables.bin` keys as LLaVA's load_pretrained_model renames them before its
    `load_state_dict(strict=False)`: `base_model.` stripped, then one `model.` when any key
    starts `model.model.`. Renamed -> original."""
    stripped = {k.removeprefix("base_model."): k for k in keys}
    if any(k.startswith("model.model.") for k in stripped):
        stripped = {k.removeprefix("model."): v for k, v in stripped.items()}
    return stripped
