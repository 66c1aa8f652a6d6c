"""What the oracle computes: the tiny checkpoints, the inputs and the test images.

Plain data shared by the live oracle, the stored fixtures and the suite. Each checkpoint is
the exact call `harness.synth.presets.build_spec(preset, model=..., checkpoint=...)`.
"""

from __future__ import annotations

from ..synth.configs import anyres_grid
from ..synth.presets import preset

IMAGE_TOKEN_INDEX = -200  # llava.constants.IMAGE_TOKEN_INDEX

MISTRAL = {"arch": "mistral", "num_key_value_heads": 2}  # grouped-query attention, as Mistral-7B


def _grid() -> list[dict]:
    cases = []
    for arch, model in (("llama", {}), ("mistral", MISTRAL)):
        for dtype in ("float32", "float16", "bfloat16"):
            for fmt in ("bin", "safetensors"):
                cases.append({"id": f"{arch}-mlp2x_gelu-{dtype}-{fmt}", "preset": "tiny",
                              "model": {**model, "dtype": dtype}, "checkpoint": {"format": fmt}})
    for projector, extra in (("linear", {}), ("mlp3x_gelu", {}),
                             ("identity", {"mm_hidden_size": 64})):
        cases.append({"id": f"llama-{projector}-float32-bin", "preset": "tiny",
                      "model": {"projector_type": projector, "dtype": "float32", **extra},
                      "checkpoint": {"format": "bin"}})
    return cases


def _next_grid() -> list[dict]:
    """LLaVA-1.6 (NeXT) checkpoints: anyres with every merge type LLaVA has, both backbones,
    a half-precision one, and single-crop 'pad' images through the spatial_unpad merge."""
    cases = []
    for arch, model in (("llama", {}), ("mistral", MISTRAL)):
        cases.append({"id": f"next-{arch}-anyres-spatial_unpad-float32-safetensors",
                      "preset": "tiny-next", "model": {**model, "dtype": "float32"},
                      "checkpoint": {}})
    for merge in ("spatial", "flat"):
        cases.append({"id": f"next-llama-anyres-{merge}-float32-safetensors",
                      "preset": "tiny-next",
                      "model": {"dtype": "float32", "mm_patch_merge_type": merge},
                      "checkpoint": {}})
    cases.append({"id": "next-llama-anyres-spatial_unpad-bfloat16-bin", "preset": "tiny-next",
                  "model": {"dtype": "bfloat16"}, "checkpoint": {"format": "bin"}})
    cases.append({"id": "next-llama-pad-spatial_unpad-float32-safetensors",
                  "preset": "tiny-next", "model": {"dtype": "float32", "image_aspect_ratio": "pad"},
                  "checkpoint": {}})
    return cases


# Full-model cases: LLaVA's classes loaded in the case dtype.
CASES = _grid()
# LLaVA-1.6 cases, computed by the live oracle (the stored copies predate them).
NEXT_CASES = _next_grid()
MAIN_CASE = "llama-mlp2x_gelu-float32-bin"
MISTRAL_LPM_SOURCE = "mistral-mlp2x_gelu-float32-safetensors"
# A second LLaVA checkpoint, different in every weight, as the base of the projector-only path:
# logits then prove the projector came from mm_projector.bin and the rest from the base.
BASES = [{"id": "base-llama-mlp2x_gelu-float32-bin-seed1", "preset": "tiny",
          "model": {"dtype": "float32"}, "checkpoint": {"format": "bin", "seed": 1}}]

# Token ids inside the tiny vocabulary (512): BOS=1, then arbitrary ids; -200 marks an image.
INPUTS = {
    "one_image": {"input_ids": [1, 17, 305, IMAGE_TOKEN_INDEX, 42, 411, 99], "images": ["A"]},
    "two_images": {"input_ids": [1, 23, IMAGE_TOKEN_INDEX, 150, 77, IMAGE_TOKEN_INDEX, 480, 5],
                   "images": ["A", "B"]},
    "text_only": {"input_ids": [1, 300, 12, 499, 64, 128, 7], "images": []},
}
# (width, height): both non-square, one wide, one tall.
IMAGE_SIZES = {"A": (37, 23), "B": (19, 31)}
# The anyres images, on the tiny pinpoints (28 px crops: 28x56, 56x28, 56x56, 84x28, 28x84, as
# [width, height]). Between them LLaVA picks every pinpoint; `small` ties between 28x56 and
# 56x28 (the first listed wins); `wide` leaves an odd padding, where the original's unpad keeps
# one row more than the image fills; `landscape` and `portrait` unpad rows and columns.
# `rounding` and `sliver` are sizes where the original's int() truncation of a float product
# just under an integer (2.9999999999999996, 0.9999999999999999) unpads a column pair that
# llava-hf's LlavaNext, rounding first, keeps; `sliver` keeps no grid column at all, only the
# newline ends.
NEXT_IMAGE_SIZES = {"wide": (80, 20), "tall": (20, 80), "square": (60, 60), "small": (20, 15),
                    "two_by_one": (50, 26), "landscape": (60, 40), "portrait": (40, 60),
                    "rounding": (147, 196), "sliver": (49, 294)}
IMAGE_RECIPE = ("pixel (x, y) of image A = ((3x + 5y) % 256, (7xy + 11) % 256, (x*x + 2y*y) % 256), "
                "of image B the same with x and y swapped in each channel formula, of the k-th "
                "anyres image (NEXT_IMAGE_SIZES order, k from 1) that of A with 29k added to "
                "each channel before the % 256; RGB uint8, stored as raw.<name> "
                "[height, width, 3]")

# The anyres inputs: each image alone, all of them in one row, and a right-padded batch whose
# rows mix image shapes (images are consumed in order across the batch).
NEXT_INPUTS = {
    **{f"one_{name}": {"input_ids": [[1, 17, IMAGE_TOKEN_INDEX, 42, 99]], "images": [name]}
       for name in NEXT_IMAGE_SIZES},
    "all_shapes": {"input_ids": [[1, 9] + [t for _ in NEXT_IMAGE_SIZES
                                           for t in (IMAGE_TOKEN_INDEX, 33)] + [5]],
                   "images": list(NEXT_IMAGE_SIZES)},
    "batch_mixed": {"input_ids": [[1, 5, IMAGE_TOKEN_INDEX, 7, IMAGE_TOKEN_INDEX, 9],
                                  [1, 300, IMAGE_TOKEN_INDEX, 12, 0, 0]],
                    "attention_mask": [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]],
                    "images": ["wide", "small", "tall"]},
    "text_only": {"input_ids": [[1, 300, 12, 499, 64, 128, 7]], "images": []},
}


def next_crop_side() -> int:
    """The tiny tower's side in pixels: the anyres crop size."""
    return preset("tiny-next").model.vision.image_size


def next_pinpoints() -> list[list[int]]:
    """The grid pinpoints the tiny LLaVA-1.6 checkpoints' config.json lists."""
    return anyres_grid(next_crop_side())


def checkpoints() -> list[dict]:
    """Every checkpoint the oracle reads: the full-model cases and the projector-only base."""
    return CASES + BASES + NEXT_CASES


def image_sizes() -> dict[str, tuple[int, int]]:
    return {**IMAGE_SIZES, **NEXT_IMAGE_SIZES}


def _pixel(name: str, x: int, y: int) -> tuple[int, int, int]:
    if name == "B":
        x, y = y, x
    salt = 29 * (list(NEXT_IMAGE_SIZES).index(name) + 1) if name in NEXT_IMAGE_SIZES else 0
    return ((3 * x + 5 * y + salt) % 256, (7 * x * y + 11 + salt) % 256,
            (x * x + 2 * y * y + salt) % 256)


def make_image(name: str):
    """Test image `name` as a PIL RGB image, from pixel arithmetic alone."""
    from PIL import Image  # heavy: PIL

    width, height = image_sizes()[name]
    image = Image.new("RGB", (width, height))
    image.putdata([_pixel(name, x, y) for y in range(height) for x in range(width)])
    return image


# The original `load_pretrained_model` cases compute.py records (and two it records as the
# original's failures: a projector folder whose config.json has the published model_type
# "llava" breaks its projector-only path, LLaVA #1075).
LPM_CASES = ("lpm-full-llama", "lpm-full-mistral", "lpm-projector-config_llava-seed1-base",
             "lpm-projector-config_llava-same-base")
EXPECTED_FAILURES = ("lpm-projector-config_builder-seed1-base",
                     "lpm-projector-config_builder-same-base")
# LLaVA-1.6 through the original `load_pretrained_model`, on the anyres inputs.
NEXT_LPM_SOURCE = "next-mistral-anyres-spatial_unpad-float32-safetensors"
NEXT_LPM_CASES = ("lpm-next-mistral",)


def case_ids() -> list[str]:
    """The LLaVA-1.5 cases every oracle, stored copies included, holds."""
    return [c["id"] for c in CASES] + list(LPM_CASES)


def next_case_ids() -> list[str]:
    """The LLaVA-1.6 cases, held by the live oracle."""
    return [c["id"] for c in NEXT_CASES] + list(NEXT_LPM_CASES)
