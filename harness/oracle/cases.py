"""What the oracle computes: the tiny checkpoints, the inputs and the test images.

Plain data shared by the live oracle, the stored fixtures and the suite. Each checkpoint is
the exact call `harness.synth.presets.build_spec(preset, model=..., checkpoint=...)`.
"""

from __future__ import annotations

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


# Full-model cases: LLaVA's classes loaded in the case dtype.
CASES = _grid()
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
IMAGE_RECIPE = ("pixel (x, y) of image A = ((3x + 5y) % 256, (7xy + 11) % 256, (x*x + 2y*y) % 256), "
                "of image B the same with x and y swapped in each channel formula; RGB uint8, "
                "stored as raw.<name> [height, width, 3]")


def checkpoints() -> list[dict]:
    """Every checkpoint the oracle reads: the full-model cases and the projector-only base."""
    return CASES + BASES


def _pixel(name: str, x: int, y: int) -> tuple[int, int, int]:
    if name == "B":
        x, y = y, x
    return (3 * x + 5 * y) % 256, (7 * x * y + 11) % 256, (x * x + 2 * y * y) % 256


def make_image(name: str):
    """Test image `name` as a PIL RGB image, from pixel arithmetic alone."""
    from PIL import Image

    width, height = IMAGE_SIZES[name]
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


def case_ids() -> list[str]:
    return [c["id"] for c in CASES] + list(LPM_CASES)
