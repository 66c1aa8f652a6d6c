"""The original LLaVA checkpoint layout: every tensor's key, shape and dtype, in state-dict order.

The order is the one `LlavaLlamaForCausalLM.state_dict()` yields (a module's own parameters,
then its buffers, then its children), which is what transformers' sharding walks: getting it
right is what makes the 7B preset split into the published two shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..checkpoint.formats import Shaped
from ..llava.keys import IMAGE_NEWLINE, PROJECTOR_PREFIX, VISION_PREFIX
from ..llava.projector import mlp_depth
from .specs import ModelSpec, VisionSpec

__all__ = ["IMAGE_NEWLINE", "PROJECTOR_PREFIX", "VISION_PREFIX", "TensorInfo", "clip_tensors",
           "clip_tower_config", "clip_vision_config", "model_tensors", "projector_tensors"]


@dataclass(frozen=True)
class TensorInfo(Shaped):
    key: str
    shape: tuple[int, ...]
    dtype: str
    # How values are drawn (see fill.py): weight, bias, norm, inv_freq.
    kind: str
    # Which part of the model: lm, projector, vision, newline.
    group: str



def projector_tensors(model: ModelSpec) -> list[TensorInfo]:
    """`build_vision_projector`'s parameters: Linear for linear, Sequential for mlpNx_gelu."""
    d_in, d_out, dtype = model.mm_hidden_size, model.hidden_size, model.dtype
    if model.projector_type == "identity":
        return []
    if model.projector_type == "linear":
        names = [("", d_in)]
    else:
        # Linear layers sit at even Sequential indices, GELUs between them.
        names = [(f"{2 * i}.", d_in if i == 0 else d_out)
                 for i in range(mlp_depth(model.projector_type))]
    out = []
    for prefix, fan_in in names:
        out.append(TensorInfo(f"{PROJECTOR_PREFIX}{prefix}weight", (d_out, fan_in), dtype,
                              "weight", "projector"))
        out.append(TensorInfo(f"{PROJECTOR_PREFIX}{prefix}bias", (d_out,), dtype, "bias",
                              "projector"))
    return out


def _layer_tensors(model: ModelSpec, i: int, legacy_buffers: bool) -> list[TensorInfo]:
    h, kv = model.hidden_size, model.num_key_value_heads * model.head_dim
    p, dt = f"model.layers.{i}.", model.dtype
    out = [
        TensorInfo(p + "self_attn.q_proj.weight", (h, h), dt, "weight", "lm"),
        TensorInfo(p + "self_attn.k_proj.weight", (kv, h), dt, "weight", "lm"),
        TensorInfo(p + "self_attn.v_proj.weight", (kv, h), dt, "weight", "lm"),
        TensorInfo(p + "self_attn.o_proj.weight", (h, h), dt, "weight", "lm"),
    ]
    if legacy_buffers:
        # transformers < 4.31 persisted the rotary buffer, always in float32.
        out.append(TensorInfo(p + "self_attn.rotary_emb.inv_freq", (model.head_dim // 2,),
                              "float32", "inv_freq", "lm"))
    m = model.intermediate_size
    out += [
        TensorInfo(p + "mlp.gate_proj.weight", (m, h), dt, "weight", "lm"),
        TensorInfo(p + "mlp.up_proj.weight", (m, h), dt, "weight", "lm"),
        TensorInfo(p + "mlp.down_proj.weight", (h, m), dt, "weight", "lm"),
        TensorInfo(p + "input_layernorm.weight", (h,), dt, "norm", "lm"),
        TensorInfo(p + "post_attention_layernorm.weight", (h,), dt, "norm", "lm"),
    ]
    return out


def clip_tower_config(vision: VisionSpec, dtype: str) -> dict:
    """The tower's config.json as openai/clip-vit-large-patch14-336 has it (quick_gelu, eps
    1e-5), with this spec's dimensions: written by the builder itself, so its bytes never
    depend on the installed transformers (whose save_pretrained stamps its version)."""
    return {
        "architectures": ["CLIPVisionModel"], "attention_dropout": 0.0, "dtype": dtype,
        "hidden_act": "quick_gelu", "hidden_size": vision.hidden_size,
        "image_size": vision.image_size, "initializer_factor": 1.0, "initializer_range": 0.02,
        "intermediate_size": vision.intermediate_size, "layer_norm_eps": 1e-5,
        "model_type": "clip_vision_model", "num_attention_heads": vision.num_attention_heads,
        "num_channels": 3, "num_hidden_layers": vision.num_hidden_layers,
        "patch_size": vision.patch_size, "projection_dim": vision.projection_dim,
    }


def clip_vision_config(vision: VisionSpec):
    """The transformers config of that tower."""
    from transformers import CLIPVisionConfig  # heavy: transformers

    fields = clip_tower_config(vision, "float32")
    for name in ("architectures", "dtype", "model_type"):
        fields.pop(name)
    return CLIPVisionConfig(**fields)


@lru_cache(maxsize=16)
def _clip_state_shapes(vision: VisionSpec) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The CLIP vision model's persistent state, read off a meta-device instance."""
    import torch  # heavy: torch
    from transformers import CLIPVisionModel  # heavy: transformers

    with torch.device("meta"):
        module = CLIPVisionModel(clip_vision_config(vision))
    return tuple((k, tuple(v.shape)) for k, v in module.state_dict().items())


def clip_tensors(vision: VisionSpec, dtype: str, prefix: str = "") -> list[TensorInfo]:
    """A CLIP vision tower's tensors under `prefix`, in the on-disk `vision_model.` layout."""
    out = []
    for key, shape in _clip_state_shapes(vision):
        # transformers 5 flattened CLIPVisionModel; checkpoints (saved by 4.x, and by 5.x on
        # disk) nest the transformer under `vision_model.`, the layout to reproduce.
        key = key if key.startswith("vision_model.") else "vision_model." + key
        leaf = key.rsplit(".", 1)[-1]
        norm = "norm" in key or "layrnorm" in key  # CLIP spells one of them 'pre_layrnorm'
        kind = "bias" if leaf == "bias" else ("norm" if norm else "weight")
        out.append(TensorInfo(prefix + key, shape, dtype, kind, "vision"))
    return out


def vision_tensors(model: ModelSpec) -> list[TensorInfo]:
    """The tower as LLaVA-NeXT stores it inside the checkpoint."""
    return clip_tensors(model.vision, model.dtype, VISION_PREFIX)


def model_tensors(model: ModelSpec, legacy_buffers: bool) -> list[TensorInfo]:
    """Every tensor of an original-layout LLaVA checkpoint, in state-dict order."""
    out = []
    if model.has_image_newline:
        # A parameter owned by LlavaModel itself, so it precedes the model's children.
        out.append(TensorInfo(IMAGE_NEWLINE, (model.hidden_size,), model.dtype, "weight",
                              "newline"))
    out.append(TensorInfo("model.embed_tokens.weight", (model.vocab_size, model.hidden_size),
                          model.dtype, "weight", "lm"))
    for i in range(model.num_hidden_layers):
        out += _layer_tensors(model, i, legacy_buffers)
    out.append(TensorInfo("model.norm.weight", (model.hidden_size,), model.dtype, "norm", "lm"))
    if model.vision_in_checkpoint:
        out += vision_tensors(model)
    out += projector_tensors(model)
    out.append(TensorInfo("lm_head.weight", (model.vocab_size, model.hidden_size), model.dtype,
                          "weight", "lm"))
    return out


def inv_freq_values(model: ModelSpec):
    """The exact rotary inverse frequencies transformers computed, as a float32 tensor."""
    import torch  # heavy: torch

    exponents = torch.arange(0, model.head_dim, 2, dtype=torch.int64).float() / model.head_dim
    return 1.0 / (model.rope_theta ** exponents)
