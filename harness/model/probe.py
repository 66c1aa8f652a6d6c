"""A fixed text + image input and the logits a model gives for it.

Every equivalence check (load paths, LoRA merge, quantization drift, layout conversion) runs the
same probe so results compare across suites: deterministic token ids with image tokens in the
middle, and non-square RGB images made from pixel arithmetic (no RNG, no files), so `pad`
preprocessing is exercised.
"""

from __future__ import annotations

import torch

from .images import process_images
from .splice import IMAGE_TOKEN_INDEX


def probe_image(width: int = 37, height: int = 23, salt: int = 0):
    """An RGB image whose pixels are a fixed function of their coordinates."""
    import numpy as np  # heavy: numpy
    from PIL import Image  # heavy: PIL

    y, x = np.mgrid[0:height, 0:width]
    channels = [(x * 7 + y * 3 + salt) % 256, (x * y + 11 * salt) % 256,
                (255 - x * 5 + y * 2 + salt) % 256]
    return Image.fromarray(np.stack(channels, axis=-1).astype("uint8"), mode="RGB")


def probe_ids(vocab_size: int, length: int = 12, images: int = 1, bos: int = 1) -> torch.Tensor:
    """[1, length + images] ids: BOS, then text ids spread over the vocabulary, with the image
    tokens placed evenly through the text."""
    text = [(bos if i == 0 else 3 + (i * 37) % (vocab_size - 3)) for i in range(length)]
    step = max(1, length // (images + 1))
    for n in range(images, 0, -1):
        text.insert(min(n * step, len(text)), IMAGE_TOKEN_INDEX)
    return torch.tensor([text], dtype=torch.long)


@torch.no_grad()
def probe_logits(model, image_processor, *, images: int = 1, length: int = 12,
                 ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [1, seq, vocab] of the probe on `model` (text only when images == 0)."""
    ids = probe_ids(model.config.vocab_size, length, images) if ids is None else ids
    ids = ids.to(model.device)
    if images == 0:
        return model(input_ids=ids).logits
    pil = [probe_image(37 + 5 * n, 23 + 3 * n, salt=n) for n in range(images)]
    pixels = to_model(process_images(pil, image_processor, model.config), model)
    return model(input_ids=ids, images=pixels, image_sizes=[im.size for im in pil]).logits


def to_model(pixels, model):
    """Pixels (a tensor, or a list of per-image crop tensors) on the model's device, in the
    dtype images go in as."""
    dtype = _compute_dtype(model)
    if isinstance(pixels, list):
        return [x.to(device=model.device, dtype=dtype) for x in pixels]
    return pixels.to(device=model.device, dtype=dtype)


def _compute_dtype(model) -> torch.dtype:
    """The dtype images go in as: the projector's (quantized models keep it unquantized)."""
    projector = getattr(model.get_model(), "mm_projector", None)
    params = list(projector.parameters()) if projector is not None else []
    return params[0].dtype if params else model.dtype
