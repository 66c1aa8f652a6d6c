"""LLaVA causal LMs in the original layout: `model.layers.*`, `model.mm_projector.*`,
`model.vision_tower.vision_tower.*` (loaded separately), `lm_head.weight`.

Built on transformers' Llama/Mistral classes: the LLaVA model is the language model with a
projector and a vision tower attached to its inner `model`, and a forward that splices image
features into the embeddings where the ids hold IMAGE_TOKEN_INDEX (-200).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    MistralModel,
)

from ..errors import HarnessError
from ..llava.config import uses_image_newline
from .projector import build_projector, projector_type_of_config
from .anyres import merge_crops
from .splice import IMAGE_TOKEN_INDEX, splice
from .vision import VisionTower

# Keys a LLaVA checkpoint may hold that the model deliberately does not load: the vision tower
# is re-read from its own folder (as the original does) and the legacy rotary buffers are
# recomputed by transformers.
IGNORED_CHECKPOINT_KEYS = [r"^model\.vision_tower\.", r"rotary_emb\.inv_freq$"]


class LlavaLlamaConfig(LlamaConfig):
    model_type = "llava_llama"


class LlavaMistralConfig(MistralConfig):
    model_type = "llava_mistral"


def _attach_multimodal(inner: nn.Module, config) -> None:
    """What the original's LlavaMetaModel adds to the inner model when the config names a
    vision tower: the tower (empty until load_model), the projector, and for `*unpad*` merges
    the image_newline vector."""
    if not getattr(config, "mm_vision_tower", None):
        return
    inner.vision_tower = VisionTower(config)
    inner.mm_projector = build_projector(projector_type_of_config(config),
                                         config.mm_hidden_size, config.hidden_size)
    if uses_image_newline(getattr(config, "mm_patch_merge_type", None)):
        inner.image_newline = nn.Parameter(torch.empty(config.hidden_size))


class LlavaLlamaModel(LlamaModel):
    config_class = LlavaLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        _attach_multimodal(self, config)


class LlavaMistralModel(MistralModel):
    config_class = LlavaMistralConfig

    def __init__(self, config):
        super().__init__(config)
        _attach_multimodal(self, config)


class LlavaMixin:
    """Image encoding, splicing, forward and generate, shared by the Llama and Mistral
    variants."""

    _keys_to_ignore_on_load_unexpected = IGNORED_CHECKPOINT_KEYS

    def get_model(self):
        return self.model

    def get_vision_tower(self) -> VisionTower | None:
        return getattr(self.model, "vision_tower", None)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.mm_projector(self.get_vision_tower()(images))

    def image_features(self, images, image_sizes=None) -> list[torch.Tensor] | torch.Tensor:
        """Per image, its projected features [tokens, hidden]: a batch tensor [N, 3, H, W]
        gives [N, tokens, hidden]; a list (or 5-D tensor) of per-image crops goes through the
        tower as one batch, then is merged per `mm_patch_merge_type` as the original does:
        `flat` concatenates the crops, `spatial*` lays anyres crops out on their grid
        (harness/model/anyres.py), `*unpad*` with image_newline rows."""
        if not (isinstance(images, list) or images.ndim == 5):
            return self.encode_images(images)
        crops = [x.unsqueeze(0) if x.ndim == 3 else x for x in images]
        features = torch.split(self.encode_images(torch.cat(crops, dim=0)),
                               [c.shape[0] for c in crops], dim=0)
        merge = getattr(self.config, "mm_patch_merge_type", "flat") or "flat"
        if merge == "flat":
            return [x.flatten(0, 1) for x in features]
        if not merge.startswith("spatial"):
            raise HarnessError(f"mm_patch_merge_type {merge!r}: expected 'flat' or 'spatial*'")
        tower = self.get_vision_tower()
        newline = self.model.image_newline if "unpad" in merge else None
        sizes = list(image_sizes) if image_sizes is not None else [None] * len(features)
        if len(sizes) < len(features):
            raise HarnessError(f"{len(features)} images but {len(sizes)} image_sizes")
        return [merge_crops(x, size, self.config, tower.num_patches_per_side,
                            tower.image_size, newline) for x, size in zip(features, sizes)]

    def prepare_multimodal(self, input_ids, position_ids, attention_mask, labels, images,
                           image_sizes=None):
        """(inputs_embeds, position_ids, attention_mask, labels) for the language model; ids
        pass through unchanged when there is nothing to splice (no tower, no images, or one
        decode step)."""
        if self.get_vision_tower() is None or images is None or input_ids.shape[1] == 1:
            if input_ids is not None and bool((input_ids == IMAGE_TOKEN_INDEX).any()):
                raise HarnessError(f"input ids hold image tokens ({IMAGE_TOKEN_INDEX}) but no "
                                   "images were given")
            return None, position_ids, attention_mask, labels
        if getattr(self.config, "tune_mm_mlp_adapter", False) and getattr(
                self.config, "mm_use_im_start_end", False):
            raise HarnessError("tune_mm_mlp_adapter with mm_use_im_start_end is not "
                               "implemented (nor is it in the original)")
        features = self.image_features(images, image_sizes)
        out = splice(input_ids, features, self.model.embed_tokens,
                     attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                     max_length=getattr(self.config, "tokenizer_model_max_length", None),
                     padding_side=getattr(self.config, "tokenizer_padding_side", "right"),
                     device=self.device)
        return out.inputs_embeds, out.position_ids, out.attention_mask, out.labels

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                inputs_embeds=None, labels=None, images=None, image_sizes=None, **kwargs):
        """The original's forward: images spliced into the embeddings, then the language
        model's. The KV cache, `use_cache` and the rest pass through under the names the
        installed transformers gives them (the cache is `past_key_values` before 5.25 and
        `cache` from then on; naming either here would be wrong for the other)."""
        if inputs_embeds is None:
            embeds, position_ids, attention_mask, labels = self.prepare_multimodal(
                input_ids, position_ids, attention_mask, labels, images, image_sizes)
            if embeds is not None:
                input_ids, inputs_embeds = None, embeds
        return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, inputs_embeds=inputs_embeds,
                               labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, inputs=None, images=None, image_sizes=None, **kwargs):
        """Splice once, then generate from the embeddings (the original's generate)."""
        position_ids = kwargs.pop("position_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        if "inputs_embeds" in kwargs:
            raise HarnessError("generate(): pass input ids and images, not inputs_embeds")
        embeds = None
        if images is not None:
            embeds, position_ids, attention_mask, _ = self.prepare_multimodal(
                inputs, position_ids, attention_mask, None, images, image_sizes)
        if embeds is None:
            embeds = self.model.embed_tokens(inputs)
        extra = {"position_ids": position_ids} if position_ids is not None else {}
        return super().generate(attention_mask=attention_mask, inputs_embeds=embeds,
                                **extra, **kwargs)


class LlavaLlamaForCausalLM(LlavaMixin, LlamaForCausalLM):
    config_class = LlavaLlamaConfig

    def __init__(self, config):
        # Skip LlamaForCausalLM.__init__ (it would build a plain LlamaModel first).
        super(LlamaForCausalLM, self).__init__(config)
        self.model = LlavaLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class LlavaMistralForCausalLM(LlavaMixin, MistralForCausalLM):
    config_class = LlavaMistralConfig

    def __init__(self, config):
        super(MistralForCausalLM, self).__init__(config)
        self.model = LlavaMistralModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


MODEL_CLASSES = {"llama": LlavaLlamaForCausalLM, "mistral": LlavaMistralForCausalLM}
CONFIG_CLASSES = {"llama": LlavaLlamaConfig, "mistral": LlavaMistralConfig}
