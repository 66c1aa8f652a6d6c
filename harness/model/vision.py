"""The CLIP vision tower as LLaVA wraps it: features from one hidden layer, CLS dropped.

It is created empty with the model and loaded afterwards from the local folder the config names
(`mm_vision_tower`), as the original does: vision tensors stored inside a LLaVA checkpoint are
ignored. Nothing is ever downloaded: a tower name that is not a local folder is an error.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import HarnessError


class VisionTowerError(HarnessError):
    pass


# LLaVA's released code runs CLIP under transformers 4.37, whose CLIPAttention scales the
# queries before the product and takes the softmax in the tower's own dtype; transformers 5's
# eager path scales after and upcasts the softmax, and sdpa fuses it all. The results differ in
# the last bits (1e-7 in float32 on the tiny tower), so the tower runs this function to give
# the original's features bit for bit.
ORIGINAL_CLIP_ATTENTION = "llava_original_clip"


#
# The memory layout matters as much as the order: 4.37 makes q, k and v contiguous
# [batch * heads, tokens, head_dim] and multiplies with `torch.bmm`, while a `matmul` on the
# [batch, heads, tokens, head_dim] views transformers 5 passes in hands MKL strided operands,
# for which it picks other GEMM kernels on some CPUs and shapes (seen on an AMD EPYC: a 64-wide
# tower with two images differed by 1.2e-7 in float32; one image, or a 32-wide tower, did not).
def _original_clip_attention(module, query, key, value, attention_mask, scaling, dropout=0.0,
                             **kwargs):
    batch, heads, tokens, head_dim = query.shape
    flat = (batch * heads, -1, head_dim)
    query = (query * scaling).contiguous().view(flat)
    key = key.contiguous().view(flat)
    value = value.contiguous().view(flat)
    weights = torch.bmm(query, key.transpose(1, 2))
    if attention_mask is not None:
        weights = (weights.view(batch, heads, tokens, -1) + attention_mask).view(
            batch * heads, tokens, -1)
    weights = nn.functional.softmax(weights, dim=-1)
    probs = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.bmm(probs, value).view(batch, heads, tokens, head_dim)
    return out.transpose(1, 2).contiguous(), weights.view(batch, heads, tokens, -1)


def _register_attention() -> None:
    from transformers import AttentionInterface  # heavy: transformers

    AttentionInterface.register(ORIGINAL_CLIP_ATTENTION, _original_clip_attention)


class VisionTower(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.tower_path = getattr(config, "mm_vision_tower", None) or getattr(
            config, "vision_tower", None)
        self.select_layer = config.mm_vision_select_layer
        self.select_feature = getattr(config, "mm_vision_select_feature", "patch")
        if self.select_feature not in ("patch", "cls_patch"):
            raise VisionTowerError(f"mm_vision_select_feature {self.select_feature!r}: expected "
                                   "'patch' or 'cls_patch'")
        self.is_loaded = False
        self.image_processor = None

    def load_model(self, path: str | Path | None = None, *, dtype: torch.dtype | None = None,
                   device: str | torch.device | None = None) -> None:
        """Read the CLIP weights and image processor from `path` (default: the config's
        `mm_vision_tower`), in `dtype` on `device`."""
        from transformers import CLIPImageProcessor, CLIPVisionModel  # heavy: transformers

        if self.is_loaded:
            return
        folder = Path(path or self.tower_path)
        if not (folder / "config.json").is_file():
            raise VisionTowerError(
                f"{folder}: vision tower folder not found (mm_vision_tower); the harness never "
                "downloads: build one locally or pass its folder")
        self.image_processor = CLIPImageProcessor.from_pretrained(folder)
        _register_attention()
        kwargs = {"dtype": dtype} if dtype is not None else {}
        tower = CLIPVisionModel.from_pretrained(
            folder, attn_implementation=ORIGINAL_CLIP_ATTENTION, **kwargs)
        tower.requires_grad_(False)
        if device is not None:
            tower = tower.to(device)
        self.vision_tower = tower.eval()
        self.is_loaded = True

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device

    @property
    def hidden_size(self) -> int:
        return self.vision_tower.config.hidden_size

    @property
    def image_size(self) -> int:
        """The tower's input side in pixels: anyres grids are counted in crops of it."""
        return self.vision_tower.config.image_size

    @property
    def num_patches_per_side(self) -> int:
        cfg = self.vision_tower.config
        return cfg.image_size // cfg.patch_size

    def _select(self, hidden_states: tuple) -> torch.Tensor:
        features = hidden_states[self.select_layer]
        return features[:, 1:] if self.select_feature == "patch" else features

    @torch.no_grad()
    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list:
        """Run in the tower's dtype; hand features back in the images' dtype (the original
        casts both ways: a float16 image batch through a float32 tower gives float16)."""
        if not self.is_loaded:
            raise VisionTowerError("the vision tower is not loaded; call load_model() first")
        if isinstance(images, list):
            return [self._one(image.unsqueeze(0)).to(image.dtype) for image in images]
        return self._one(images).to(images.dtype)

    def _one(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(batch.to(device=self.device, dtype=self.dtype),
                                output_hidden_states=True)
        return self._select(out.hidden_states)
