"""What kind of folder a model path is: from its files, and the original's rule from its name.

The original `load_pretrained_model` picks its path from the model *name* (`llava`, `lora`,
whether a base is given), so a LLaVA folder called `my-model` loads as a plain language model
and fails. The harness reads the files instead and warns when the name would have said otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import HarnessError

KINDS = ("llava", "lora", "projector", "language_model", "language_model_lora")
ADAPTER_CONFIG = "adapter_config.json"
NON_LORA_TRAINABLES = "non_lora_trainables.bin"
PROJECTOR_FILES = ("mm_projector.bin", "mm_projector.safetensors")


class DetectError(HarnessError):
    pass


@dataclass(frozen=True)
class Detected:
    kind: str          # one of KINDS
    reason: str        # which files decided it, for the CLI and warnings


def _is_llava_config(folder: Path) -> bool:
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    names = [str(data.get("model_type", ""))] + list(data.get("architectures") or [])
    return bool(data.get("mm_vision_tower")) or any("llava" in n.lower() for n in names)


def _adapter_base_is_llava(folder: Path) -> bool:
    """A LoRA trained the LLaVA way saves the LLaVA config.json (or non_lora_trainables)
    beside the adapter; a plain LM LoRA has neither."""
    return (folder / NON_LORA_TRAINABLES).is_file() or _is_llava_config(folder)


def detect_kind(path: Path) -> Detected:
    folder = Path(path)
    if not folder.is_dir():
        raise DetectError(f"{folder}: not a folder")
    if (folder / ADAPTER_CONFIG).is_file():
        if _adapter_base_is_llava(folder):
            return Detected("lora", f"{ADAPTER_CONFIG} with a LLaVA config / "
                                    f"{NON_LORA_TRAINABLES}")
        return Detected("language_model_lora", f"{ADAPTER_CONFIG} without a LLaVA config")
    projector = next((n for n in PROJECTOR_FILES if (folder / n).is_file()), None)
    has_weights = any(folder.glob("*.safetensors*")) or any(folder.glob("pytorch_model*.bin*"))
    if projector and not has_weights:
        return Detected("projector", f"{projector} and no model weights")
    if not (folder / "config.json").is_file():
        raise DetectError(f"{folder}: no config.json, {ADAPTER_CONFIG} or mm_projector.bin: "
                          "not a model folder")
    if _is_llava_config(folder):
        return Detected("llava", "config.json names a vision tower / a LLaVA architecture")
    return Detected("language_model", "config.json without multimodal fields")


def kind_from_name(model_name: str, model_base) -> str:
    """The original's decision from the name alone."""
    name = model_name.lower()
    if "llava" in name:
        if model_base is None:
            return "llava"
        return "lora" if "lora" in name else "projector"
    return "language_model" if model_base is None else "language_model_lora"
