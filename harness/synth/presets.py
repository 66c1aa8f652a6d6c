"""Named presets: the tiny default and real-size models shaped like the published ones."""

from __future__ import annotations

import dataclasses

from .specs import BuildSpec, CheckpointSpec, ModelSpec, SpecError, VisionSpec

# CLIP ViT-L/14-336, the tower of every LLaVA-1.5/1.6 preset: mm_hidden_size 1024, 576 patches.
CLIP_L_336 = VisionSpec()

TINY_VISION = VisionSpec(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, image_size=28, patch_size=14, projection_dim=32,
                         tower_name="tiny-clip")

_PRESETS: dict[str, BuildSpec] = {
    # Small enough to build, load and run a forward pass in about a second on 2 CPU cores.
    "tiny": BuildSpec(
        model=ModelSpec(name="tiny", vocab_size=512, hidden_size=64, intermediate_size=172,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        max_position_embeddings=256, dtype="float32", vision=TINY_VISION,
                        tokenizer_model_max_length=256),
        checkpoint=CheckpointSpec(format="bin", shards=2, max_shard_size=None),
        with_vision_tower=True, with_tokenizer=True),
    # liuhaotian/llava-v1.5-7b: Vicuna-7B v1.5 (Llama-2-7B dims), saved by transformers 4.31.
    "llava-v1.5-7b": BuildSpec(
        model=ModelSpec(name="llava-v1.5-7b"),
        checkpoint=CheckpointSpec()),
    # liuhaotian/llava-v1.5-13b: Vicuna-13B v1.5 (Llama-2-13B dims), 3 shards at 10 GB.
    "llava-v1.5-13b": BuildSpec(
        model=ModelSpec(name="llava-v1.5-13b", hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
        checkpoint=CheckpointSpec()),
    # liuhaotian/llava-v1.6-mistral-7b: Mistral-7B-Instruct-v0.2 dims (8 kv heads), anyres with
    # a learned image_newline, fine-tuned tower stored in the checkpoint, safetensors at 5 GB,
    # no legacy inv_freq buffers (saved by a transformers that no longer persisted them).
    "llava-v1.6-mistral-7b": BuildSpec(
        model=ModelSpec(name="llava-v1.6-mistral-7b", arch="mistral", intermediate_size=14336,
                        num_key_value_heads=8, max_position_embeddings=32768,
                        rope_theta=1000000.0, image_aspect_ratio="anyres",
                        mm_patch_merge_type="spatial_unpad", vision_in_checkpoint=True,
                        tokenizer_model_max_length=4096),
        checkpoint=CheckpointSpec(format="safetensors", max_shard_size=5 * 10**9,
                                  legacy_buffers=False)),
}

# tiny with an MLP 192 wide instead of 172: every quantized layer then fits bitsandbytes' CPU
# 4-bit kernel (out_features divisible by 32), so every quantization mode runs on CPU. tiny
# itself keeps 172 (Llama-2's 11008/4096 ratio) and the oracles computed on it.
_PRESETS["tiny-quant"] = dataclasses.replace(
    _PRESETS["tiny"], model=_PRESETS["tiny"].model.replace(name="tiny-quant",
                                                          intermediate_size=192))
# tiny as LLaVA-1.6 (NeXT) checkpoints are: anyres with the pinpoints at the tiny tower's 28 px
# (1x2 .. 3x1 crops), spatial_unpad with image_newline, the tuned tower stored in the
# checkpoint, safetensors, no legacy buffers. Mistral backbones by overriding `arch`.
_PRESETS["tiny-next"] = dataclasses.replace(
    _PRESETS["tiny"],
    model=dataclasses.replace(_PRESETS["tiny"].model, name="tiny-next",
                              image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                              vision_in_checkpoint=True),
    checkpoint=_PRESETS["tiny"].checkpoint.replace(format="safetensors", legacy_buffers=False))
PRESET_NAMES = tuple(_PRESETS)
# Built in about a second, anywhere: no cache, no --llava-realsize.
TINY_PRESETS = ("tiny", "tiny-quant", "tiny-next")


def preset(name: str) -> BuildSpec:
    try:
        return _PRESETS[name]
    except KeyError:
        raise SpecError(f"preset {name!r}: must be one of {', '.join(PRESET_NAMES)}") from None


def build_spec(name: str, *, model: dict | None = None, checkpoint: dict | None = None,
               with_vision_tower: bool | None = None) -> BuildSpec:
    """A preset with any knob overridden, validated as a whole."""
    base = preset(name)
    spec = BuildSpec(
        model=base.model.replace(**(model or {})),
        checkpoint=base.checkpoint.replace(**(checkpoint or {})),
        with_vision_tower=base.with_vision_tower if with_vision_tower is None
        else with_vision_tower,
        with_tokenizer=base.with_tokenizer)
    return spec
