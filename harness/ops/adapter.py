"""A peft LoRA adapter folder as saved on disk: its config, its tensors read one at a time,
which module each tensor belongs to, and which tensors a loaded model failed to take.

peft's file layout: `adapter_config.json`, and `adapter_model.safetensors` (or `.bin`) with keys
`base_model.model.<module>.lora_A.weight` / `lora_B.weight`, DoRA's
`<module>.lora_magnitude_vector`, and for `bias="all"` / `"lora_only"` the trained biases
(`<module>.base_layer.bias` for an adapted layer, `<module>.bias` otherwise).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.paths import inside
from ..checkpoint.reader import read_file
from ..errors import HarnessError
from ..llava.kinds import ADAPTER_CONFIG
from .lora import PEFT_PREFIX

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# peft features whose merge is not W + s*B@A (+ DoRA): refused rather than merged wrongly.
UNSUPPORTED = ("lora_bias", "use_bdlora", "arrow_config", "alora_invocation_tokens",
               "velora_config", "monteclora_config", "mica", "kasa_config", "use_qalora",
               "layer_replication", "modules_to_save", "trainable_token_indices")

_LORA_SUFFIXES = {".lora_A.weight": "a", ".lora_B.weight": "b",
                  ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight":
                  "magnitude"}


class AdapterError(HarnessError):
    pass


@dataclass(frozen=True)
class AdapterConfig:
    path: Path
    r: int
    alpha: float
    rslora: bool
    dora: bool
    bias: str
    fan_in_fan_out: bool
    rank_pattern: dict
    alpha_pattern: dict

    @classmethod
    def read(cls, folder: Path) -> AdapterConfig:
        from ..checkpoint.reader import read_json

        path = folder / ADAPTER_CONFIG
        found = inside(folder, ADAPTER_CONFIG, must_exist=False)
        if found is None:
            raise AdapterError(f"{path}: missing; {folder} is not a LoRA adapter folder")
        data = read_json(found, path)
        if data.get("peft_type") != "LORA":
            raise AdapterError(f"{path}: peft_type {data.get('peft_type')!r}; only LORA merges")
        for name in UNSUPPORTED:
            if data.get(name):
                raise AdapterError(f"{path}: {name}={data[name]!r} is not supported")
        return cls(path, int(data["r"]), float(data["lora_alpha"]),
                   bool(data.get("use_rslora")), bool(data.get("use_dora")),
                   data.get("bias", "none"), bool(data.get("fan_in_fan_out")),
                   dict(data.get("rank_pattern") or {}), dict(data.get("alpha_pattern") or {}))

    def rank_and_scaling(self, module: str) -> tuple[int, float]:
        """peft's per-module rank and scaling (patterns matched as peft matches them)."""
        from peft.utils.other import get_pattern_key

        r = self.rank_pattern.get(get_pattern_key(self.rank_pattern.keys(), module), self.r)
        alpha = self.alpha_pattern.get(get_pattern_key(self.alpha_pattern.keys(), module),
                                       self.alpha)
        return r, alpha / (r ** 0.5 if self.rslora else r)


class AdapterWeights:
    """The adapter's tensors, read one at a time (a 7B rank-128 adapter is over 1 GB)."""

    def __init__(self, folder: Path, stack: ExitStack):
        found = [p for p in (inside(folder, n, must_exist=False) for n in ADAPTER_FILES)
                 if p is not None]
        if not found:
            raise AdapterError(f"{folder}: no {' or '.join(ADAPTER_FILES)}")
        self.path = found[0]
        # Validated by the checkpoint layer, then mapped: a tensor's pages are read on use.
        state = read_file(self.path)
        self.keys, self.get = list(state), state.__getitem__


@dataclass
class AdapterModule:
    a: str | None = None
    b: str | None = None
    magnitude: str | None = None



def classify(weights: AdapterWeights) -> tuple[dict[str, AdapterModule], dict[str, str]]:
    modules: dict[str, AdapterModule] = {}
    biases: dict[str, str] = {}
    for key in weights.keys:
        if not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"{weights.path}: {key} lacks peft's {PEFT_PREFIX!r} prefix")
        rest = key[len(PEFT_PREFIX):]
        kind = next(((s, k) for s, k in _LORA_SUFFIXES.items() if rest.endswith(s)), None)
        if kind is not None:
            module = rest[:-len(kind[0])]
            setattr(modules.setdefault(f"{module}.weight", AdapterModule()), kind[1], key)
        elif ".lora_" not in rest and rest.endswith(".bias"):
            biases[rest.replace(".base_layer.", ".")] = key
        else:
            raise AdapterError(f"{weights.path}: {key} is not a LoRA A/B, DoRA magnitude or bias "
                             "tensor; the merge cannot place it")
    for target, m in modules.items():
        if m.a is None or m.b is None:
            raise AdapterError(f"{weights.path}: {m.a or m.b or m.magnitude} has no matching "
                             f"lora_{'A' if m.a is None else 'B'} for {target}")
    return modules, biases



def model_key(key: str, adapter_name: str) -> str:
    """An adapter file key -> the peft model's parameter name holding it."""
    for suffix in (".lora_A.weight", ".lora_B.weight"):
        if key.endswith(suffix):
            return f"{key[:-len('.weight')]}.{adapter_name}.weight"
    for suffix in (".lora_magnitude_vector.weight", ".lora_magnitude_vector"):
        if key.endswith(suffix):
            return f"{key[:-len(suffix)]}.lora_magnitude_vector.{adapter_name}.weight"
    return key


def unapplied_adapter_problems(peft_model, adapter: Path, adapter_name: str = "default"
                               ) -> list[str]:
    """Adapter tensors the peft model did not take (peft drops them without a word), one line
    each; a vision-tower LoRA whose B is zero is inert and allowed, as in the merge. For a
    loader to call right after `PeftModel.from_pretrained`."""
    state = set(peft_model.state_dict())
    problems = []
    with ExitStack() as stack:
        weights = AdapterWeights(Path(adapter), stack)
        for key in weights.keys:
            if model_key(key, adapter_name) in state:
                continue
            b_key = key.rsplit(".lora_", 1)[0] + ".lora_B.weight" if ".lora_" in key else None
            if "vision_tower" in key and b_key in weights.keys \
                    and not torch.count_nonzero(weights.get(b_key)):
                continue
            problems.append(f"{weights.path}: {key} matches no module of the model it was "
                            "loaded into; peft would drop it silently")
    return problems
