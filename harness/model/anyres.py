"""LLaVA-1.6 (NeXT) "anyres" images, as LLaVA's released code does them.

Preprocessing (`llava.mm_utils.process_anyres_image`): pick the grid pinpoint that keeps the
most of the image and wastes the least, resize the image into it keeping its aspect ratio and
pad with black, cut it into tower-sized crops, and put the whole image, squashed to one crop,
first. Every crop then goes through the vision tower and the projector.

Merging (`prepare_inputs_labels_for_multimodal`): the crops' features are laid back out as the
padded grid, the rows or columns that are only padding are cut away (`unpad`), and with a
`*unpad*` merge the learned `image_newline` vector ends every row; the base image's features go
first. `spatial` without unpad keeps the grid crop by crop; `flat` just concatenates the crops.

Conventions are LLaVA's, which are not llava-hf's: sizes are (width, height) and so are the
pinpoints. Its quirks are kept, because they decide the numbers: `int()` truncation in the
resolution choice and in unpad, ties won by the earlier pinpoint, and an unpad that keeps one
row too many when the padding is odd.
"""

from __future__ import annotations

import math

import torch

from ..errors import HarnessError
from ..llava.config import parse_pinpoints


class AnyresError(HarnessError):
    pass


def pinpoints_of(config) -> list[tuple[int, int]]:
    """`image_grid_pinpoints` as (width, height) pairs; the original also accepts the list
    written as a string."""
    raw = getattr(config, "image_grid_pinpoints", None)
    try:
        return parse_pinpoints(raw)
    except ValueError as exc:
        raise AnyresError(f"image_grid_pinpoints {raw!r}: anyres needs {exc}") from None


def select_best_resolution(size: tuple[int, int],
                           pinpoints: list[tuple[int, int]]) -> tuple[int, int]:
    """The pinpoint (width, height) that shows the most of an image of `size` (width,
    height), then wastes the fewest pixels; the first one wins a tie."""
    width, height = size
    best, most_shown, least_wasted = None, 0, math.inf
    for w, h in pinpoints:
        scale = min(w / width, h / height)
        shown = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - shown
        if shown > most_shown or (shown == most_shown and wasted < least_wasted):
            best, most_shown, least_wasted = (w, h), shown, wasted
    return best


def resize_and_pad(image, target: tuple[int, int]):
    """`image` resized into `target` (width, height) keeping its aspect ratio (the long side
    fills it, the other rounds up), centred on black."""
    from PIL import Image  # heavy: PIL

    width, height = image.size
    target_w, target_h = target
    if target_w / width < target_h / height:
        new_w, new_h = target_w, min(math.ceil(height * target_w / width), target_h)
    else:
        new_w, new_h = min(math.ceil(width * target_h / height), target_w), target_h
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h)), ((target_w - new_w) // 2,
                                                 (target_h - new_h) // 2))
    return canvas


def crops_of(image, side: int) -> list:
    """Row by row, `side`-square crops of `image` (the last ones clipped by PIL's crop)."""
    width, height = image.size
    return [image.crop((x, y, x + side, y + side))
            for y in range(0, height, side) for x in range(0, width, side)]


def process_anyres_image(image, processor, pinpoints) -> torch.Tensor:
    """[1 + crops, 3, H, W]: the whole image squashed to one crop, then the grid's crops, each
    through the CLIP processor."""
    best = select_best_resolution(image.size, pinpoints)
    crops = crops_of(resize_and_pad(image, best), processor.crop_size["height"])
    side = processor.size["shortest_edge"]
    whole = image.resize((side, side))
    return torch.stack([processor.preprocess(crop, return_tensors="pt")["pixel_values"][0]
                        for crop in [whole, *crops]], dim=0)


def grid_shape(size: tuple[int, int], pinpoints, crop_side: int) -> tuple[int, int]:
    """(columns, rows) of crops the preprocessing cut an image of `size` into."""
    width, height = select_best_resolution(size, pinpoints)
    return width // crop_side, height // crop_side


def unpad(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Cut the padding rows (or columns) off a [C, H, W] feature grid of an image of `size`
    (width, height). `padding:-padding` keeps one row more than the image fills when the
    padding is odd, as the original does."""
    width, height = size
    grid_h, grid_w = features.shape[1:]
    if width / height > grid_w / grid_h:
        filled = int(height * (grid_w / width))
        padding = (grid_h - filled) // 2
        return features[:, padding:grid_h - padding, :]
    filled = int(width * (grid_h / height))
    padding = (grid_w - filled) // 2
    return features[:, :, padding:grid_w - padding]


def merge_crops(features: torch.Tensor, size, config, patches_per_side: int,
                crop_side: int, newline: torch.Tensor | None) -> torch.Tensor:
    """One image's [crops, tokens, hidden] projected features -> [tokens', hidden] for a
    `spatial*` merge (`newline` is image_newline for `*unpad*`, else None)."""
    if features.shape[0] == 1:  # one crop ('pad' / 'square' images): no grid to lay out
        out = features[0]
        return out if newline is None else torch.cat((out, newline[None].to(out.device)), dim=0)
    if getattr(config, "image_aspect_ratio", None) != "anyres":
        raise AnyresError(f"{features.shape[0]} crops of one image, but image_aspect_ratio is "
                          f"{getattr(config, 'image_aspect_ratio', None)!r}: only 'anyres' "
                          "has a grid to lay them out on")
    if size is None:
        raise AnyresError("anyres images need their sizes: pass image_sizes "
                          "([(width, height), ...] as PIL gives them), as LLaVA's generate does")
    base, crops = features[0], features[1:]
    side = patches_per_side
    if base.shape[0] != side * side:
        raise AnyresError(f"the base crop has {base.shape[0]} features; a {side}x{side} patch "
                          "tower gives that many")
    columns, rows = grid_shape(tuple(size), pinpoints_of(config), crop_side)
    if crops.shape[0] != columns * rows:
        raise AnyresError(f"an image of size {tuple(size)} is cut into {columns}x{rows} crops "
                          f"by the pinpoints, but {crops.shape[0]} crops were given")
    grid = crops.view(rows, columns, side, side, -1)
    if newline is None:
        laid_out = grid.permute(0, 2, 1, 3, 4).contiguous().flatten(0, 3)
        return torch.cat((base, laid_out), dim=0)
    grid = grid.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)  # [C, H, W]
    grid = unpad(grid, tuple(size))
    ends = newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.device)
    laid_out = torch.cat((grid, ends), dim=-1).flatten(1, 2).transpose(0, 1)
    return torch.cat((base, laid_out), dim=0)
