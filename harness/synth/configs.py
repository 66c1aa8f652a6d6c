"""config.json and generation_config.json exactly as LLaVA's training saved them.

Field names and values follow the published liuhaotian/llava-v1.5-* and llava-v1.6-mistral-7b
configs (see ../shared/NOTES.md); only dimensions and `mm_vision_tower` vary with the spec.
"""

from __future__ import annotations

import json

from .specs import ModelSpec

# What LLaVA-NeXT lists for anyres at 336 px (llava-v1.6-*): [width, height] pairs, in crops
# of the tower's side: 1x2, 2x1, 2x2, 3x1, 1x3.
ANYRES_GRID = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
ANYRES_CROPS = [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]


def anyres_grid(image_size: int) -> list[list[int]]:
    """LLaVA-NeXT's pinpoints for a tower of `image_size` pixels (ANYRES_GRID at 336)."""
    return [[w * image_size, h * image_size] for w, h in ANYRES_CROPS]


def llava_config_json(model: ModelSpec, vision_tower: str) -> dict:
    """The LLaVA config.json for `model`, its tower named by `vision_tower` (hub id or path)."""
    mistral = model.arch == "mistral"
    config = {
        "_name_or_path": model.name,
        "architectures": ["LlavaMistralForCausalLM" if mistral else "LlavaLlamaForCausalLM"],
        "model_type": "llava_mistral" if mistral else "llava",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": model.hidden_size,
        "intermediate_size": model.intermediate_size,
        "initializer_range": 0.02,
        "max_position_embeddings": model.max_position_embeddings,
        "num_attention_heads": model.num_attention_heads,
        "num_hidden_layers": model.num_hidden_layers,
        "num_key_value_heads": model.num_key_value_heads,
        "rms_norm_eps": model.rms_norm_eps,
        "rope_theta": model.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": model.dtype,
        "use_cache": True,
        "vocab_size": model.vocab_size,
        # The multimodal fields LLaVA's model and loader read.
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": model.image_aspect_ratio,
        "image_grid_pinpoints": anyres_grid(model.vision.image_size)
        if model.image_aspect_ratio == "anyres" else None,
        "mm_hidden_size": model.mm_hidden_size,
        "mm_patch_merge_type": model.mm_patch_merge_type,
        "mm_projector_lr": None,
        "mm_projector_type": model.projector_type,
        "mm_resampler_type": None,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": vision_tower,
        "tokenizer_model_max_length": model.tokenizer_model_max_length,
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": model.vision_in_checkpoint,
        "use_mm_proj": True,
    }
    if mistral:
        config.update({"sliding_window": None, "transformers_version": "4.36.2"})
    else:
        config.update({"pad_token_id": 0, "pretraining_tp": 1, "rope_scaling": None,
                       "transformers_version": "4.31.0"})
    return config


def generation_config(model: ModelSpec) -> dict:
    config = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}
    if model.arch == "llama":
        config.update({"pad_token_id": 0, "transformers_version": "4.31.0"})
    else:
        config["transformers_version"] = "4.36.2"
    return config


def dump(config: dict) -> str:
    """transformers' own formatting: sorted keys, two-space indent, trailing newline."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"
