"""The language model inside a LLaVA checkpoint, loaded as a plain transformers Llama/Mistral.

Used to check that a checkpoint's language side is sound (the foundation's smoke test and the
main job); the strip operation builds on the same key rule.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.reader import open_folder
from ..llava.config import (architecture_of, checked, constructor_fields, is_hf_layout,
                            language_model_fields, lm_fields, read_config)
from ..llava.keys import LAYOUT_MAPS, is_language_model_key
from .config import build_config

__all__ = ["is_language_model_key", "language_model_config", "load_language_model"]


def language_model_config(llava_config: dict):
    """The plain Llama / Mistral config inside a (checked) LLaVA config of either layout."""
    from transformers import LlamaConfig, MistralConfig  # heavy: transformers

    checked(llava_config, "config.json")
    mistral = architecture_of(llava_config) == "mistral"
    fields = constructor_fields(language_model_fields(lm_fields(llava_config)))
    return build_config(MistralConfig if mistral else LlamaConfig, fields, "config.json")


def load_language_model(folder: Path, dtype=None):
    """The checkpoint's language model as Llama/MistralForCausalLM, strictly: every expected
    key present, nothing left over; raises ValueError listing what differs. Instantiates the
    model in memory: meant for tiny checkpoints (real-size ones are checked from headers)."""
    from transformers import AutoModelForCausalLM  # heavy: transformers

    data = read_config(Path(folder))
    config = language_model_config(data)
    ckpt = open_folder(folder)
    layout = LAYOUT_MAPS["hf" if is_hf_layout(data) else "original"]
    names = {key: layout(key) for key in ckpt.tensors if layout.covers(key)}
    stored = {key: name for key, name in names.items() if name and is_language_model_key(name)}
    state = {stored[k]: v for k, v in ckpt.read(list(stored)).items()}
    keys = list(state)
    model = AutoModelForCausalLM.from_config(config, dtype=state[keys[0]].dtype)
    expected = set(model.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{folder}: language model keys differ: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
