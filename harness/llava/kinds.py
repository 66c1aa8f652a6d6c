"""The kinds of LLaVA folder, told from their files (and the original's rule from the name).

- `llava`: a full LLaVA checkpoint, original layout (v1.5, or v1.6 with anyres);
- `llava-hf`: a full checkpoint in transformers' layout (LlavaForConditionalGeneration /
  LlavaNextForConditionalGeneration);
- `lora`: a LoRA adapter trained the LLaVA way (`adapter_config.json`, the LLaVA config and
  `non_lora_trainables.bin`);
- `projector`: a stage-1 folder, `mm_projector.bin` (and its config) without model weights;
- `language_model`: a plain Llama / Mistral folder (what stripping makes);
- `language_model_lora`: a LoRA adapter of a plain language model.

A pre-quantized folder is one of these with `quantization_config` in its config.json.

The original `load_pretrained_model` picks its path from the model *name* (`llava`, `lora`,
whether a base is given), so a LLaVA folder called `my-model` loads as a plain language model
and fails. The harness reads the files instead and warns when the name would have said otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.formats import INDEX_NAMES, SINGLE_NAMES
from ..checkpoint.paths import inside
from ..checkpoint.problems import CheckpointError
from .adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, NON_LORA_TRAINABLES
from .config import is_hf_layout, is_llava_config, read_config
from .errors import ContractError

KINDS = ("llava", "llava-hf", "lora", "projector", "language_model", "language_model_lora")
PROJECTOR_FILES = ("mm_projector.bin", "mm_projector.safetensors")
# A tokenizer's vocabulary, one of which a folder needs to be loaded by LLaVA's loader.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
# The language model's side files: what a merged or stripped folder keeps of its source.
LM_SIDE_FILES = ("generation_config.json", "tokenizer.model", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


class DetectError(ContractError):
    pass


@dataclass(frozen=True)
class Detected:
    kind: str          # one of KINDS
    reason: str        # which files decided it, for the CLI and warnings


def has_file(folder: Path, name: str) -> bool:
    """`name` is a regular file in `folder` (a link out of the folder is refused, naming it)."""
    return inside(folder, name, must_exist=False) is not None


def has_weights(folder: Path) -> bool:
    """A model's weights: an index or a single weights file (not mm_projector.*)."""
    return any(has_file(folder, n) for n in (*INDEX_NAMES.values(), *SINGLE_NAMES.values()))


def _config(folder: Path, check: bool) -> dict | None:
    """The folder's config.json (held to the schema with `check`); None when there is none."""
    if not has_file(folder, "config.json"):
        return None
    data = read_config(folder, check=check)
    return data if isinstance(data, dict) else None


def detect_kind(path: Path, check_config: bool = True) -> Detected:
    """The folder's kind. `check_config=False` tells the kind of a folder whose config.json is
    malformed (the linter reports the fields; every operation refuses them first)."""
    folder = Path(path)
    if not folder.is_dir():
        raise DetectError(f"{folder}: not a folder")
    config = _config(folder, check_config)
    if has_file(folder, ADAPTER_CONFIG):
        if has_file(folder, NON_LORA_TRAINABLES) or (config and is_llava_config(config)):
            return Detected("lora", f"{ADAPTER_CONFIG} with a LLaVA config / "
                                    f"{NON_LORA_TRAINABLES}")
        return Detected("language_model_lora", f"{ADAPTER_CONFIG} without a LLaVA config")
    projector = next((n for n in PROJECTOR_FILES if has_file(folder, n)), None)
    if projector and not has_weights(folder):
        return Detected("projector", f"{projector} and no model weights")
    if config is None:
        raise DetectError(f"{folder}: no config.json, {ADAPTER_CONFIG} or mm_projector.bin: "
                          "not a model folder")
    if is_hf_layout(config):
        return Detected("llava-hf", "config.json describes a llava-hf model (text_config / "
                                    "Llava*ForConditionalGeneration)")
    if is_llava_config(config):
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


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "CheckpointError", "DetectError", "Detected",
           "KINDS", "LM_SIDE_FILES", "NON_LORA_TRAINABLES", "PROJECTOR_FILES", "detect_kind", "has_file",
           "has_weights", "kind_from_name"]
