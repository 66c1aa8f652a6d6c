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
from ..llava.adapter import ADAPTER_WEIGHTS as ADAPTER_FILES
from ..llava.adapter import PEFT_PREFIX, LoraModule, adapter_keys, read_adapter_config

# peft features whose merge is not W + s*B@A (+ DoRA): refused rather than merged wrongly.
UNSUPPORTED = ("lora_bias", "use_bdlora", "arrow_config", "alora_invocation_tokens",
               "velora_config", "monteclora_config", "mica", "kasa_config", "use_qalora",
               "layer_replication", "modules_to_save", "trainable_token_indices")



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
        data = read_adapter_config(folder)  # held to the schema: peft_type LORA, r, alpha, ...
        path = folder / "adapter_config.json"
        for name in UNSUPPORTED:
            if data.get(name):
                raise AdapterError(f"{path}: {name}={data[name]!r} is not supported")
        return cls(path, int(data["r"]), float(data["lora_alpha"]),
                   bool(data.get("use_rslora")), bool(data.get("use_dora")),
                   data.get("bias", "none"), bool(data.get("fan_in_fan_out")),
                   dict(data.get("rank_pattern") or {}), dict(data.get("alpha_pattern") or {}))

    def rank_and_scaling(self, module: str) -> tuple[int, float]:
        """peft's per-module rank and scaling (patterns matched as peft matches them)."""
        from peft.utils.other import get_pattern_key  # heavy: peft

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


def classify(weights: AdapterWeights) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """The adapter's LoRA modules (by the base weight they adapt) and trained biases; a key
    that is neither, or a module missing a half, is an AdapterError naming it."""
    found = adapter_keys(weights.keys)
    for key in found.foreign:
        if not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"{weights.path}: {key} lacks peft's {PEFT_PREFIX!r} prefix")
        raise AdapterError(f"{weights.path}: {key} is not a LoRA A/B, DoRA magnitude or bias "
                           "tensor; the merge cannot place it")
    for target, m in found.modules.items():
        if m.a is None or m.b is None:
            raise AdapterError(f"{weights.path}: {m.a or m.b or m.magnitude} has no matching "
                               f"lora_{'A' if m.a is None else 'B'} for {target}")
    return found.modules, found.biases


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
