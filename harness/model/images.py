"""Image preprocessing as LLaVA does it: `pad` squares the image with the processor's mean
colour before the CLIP processor; `anyres` cuts it into crops on a grid pinpoint
(harness/model/anyres.py); anything else goes straight to the processor."""

from __future__ import annotations

import torch

from .anyres import pinpoints_of, process_anyres_image


def expand_to_square(image, background: tuple[int, ...]):
    """Paste `image` centred on a square canvas of `background` (the longer side wins; the
    offset rounds down, as the original's integer division does)."""
    from PIL import Image  # heavy: PIL

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_colour(image_processor) -> tuple[int, ...]:
    # int(x * 255) truncates, exactly as the original computes the pad colour.
    return tuple(int(x * 255) for x in image_processor.image_mean)


def process_images(images: list, image_processor, config) -> torch.Tensor | list[torch.Tensor]:
    """PIL images -> pixel tensor [N, 3, H, W], or [N, crops, 3, H, W] for anyres (a list
    when shapes differ). Anyres models also need `image_sizes`: `[im.size for im in images]`."""
    aspect = getattr(config, "image_aspect_ratio", None)
    if aspect == "anyres":
        pinpoints = pinpoints_of(config)
        out = [process_anyres_image(image, image_processor, pinpoints) for image in images]
    elif aspect == "pad":
        colour = mean_colour(image_processor)
        out = [image_processor.preprocess(expand_to_square(image, colour),
                                          return_tensors="pt")["pixel_values"][0]
               for image in images]
    else:
        return image_processor(images, return_tensors="pt")["pixel_values"]
    if all(x.shape == out[0].shape for x in out):
        return torch.stack(out, dim=0)
    return out
