"""The language model inside a LLaVA checkpoint, loaded as a plain transformers Llama/Mistral.

Used to check that a checkpoint's language side is sound (the foundation's smoke test and the
main job); the strip operation builds on the same key rule.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint.reader import open_folder
from ..synth.layout import IMAGE_NEWLINE, PROJECTOR_PREFIX, VISION_PREFIX

# LLaVA-only config fields; everything else is a plain language model's config.
_LLAVA_ONLY_PREFIXES = ("mm_", "image_", "tune_mm_", "unfreeze_mm_", "freeze_mm_", "tokenizer_")
_LLAVA_ONLY_FIELDS = {"use_mm_proj", "model_type", "architectures", "_name_or_path",
                      "transformers_version"}


def is_language_model_key(key: str) -> bool:
    """False for the projector, the vision tower, image_newline and legacy rotary buffers."""
    return not (key.startswith((PROJECTOR_PREFIX, VISION_PREFIX)) or key == IMAGE_NEWLINE
                or key.endswith("rotary_emb.inv_freq"))


def language_model_config(llava_config: dict):
    from transformers import LlamaConfig, MistralConfig

    fields = {k: v for k, v in llava_config.items()
              if not k.startswith(_LLAVA_ONLY_PREFIXES) and k not in _LLAVA_ONLY_FIELDS}
    mistral = "mistral" in llava_config.get("model_type", "")
    return (MistralConfig if mistral else LlamaConfig)(**fields)


def load_language_model(folder: Path, dtype=None):
    """The checkpoint's language model as Llama/MistralForCausalLM, strictly: every expected
    key present, nothing left over; raises ValueError listing what differs. Instantiates the
    model in memory: meant for tiny checkpoints (real-size ones are checked from headers)."""
    from transformers import AutoModelForCausalLM

    config = language_model_config(json.loads((Path(folder) / "config.json").read_text()))
    ckpt = open_folder(folder)
    keys = [k for k in ckpt.tensors if is_language_model_key(k)]
    state = ckpt.read(keys)
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
