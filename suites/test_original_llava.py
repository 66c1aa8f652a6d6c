"""The harness's LLaVA model against LLaVA's own code, bit for bit.

`fixtures/reference/original-llava/` holds logits (and image features) that haotian-liu/LLaVA's
released code computed, under its pinned transformers 4.37, on tiny checkpoints this harness's
builder makes deterministically (see its README for how they were produced). Here the same
checkpoints are rebuilt from the manifest, loaded through the harness, fed the same inputs, and
every output must be identical: every dtype (float32, float16, bfloat16), both architectures,
both formats, every projector type, and the original's `load_pretrained_model` paths.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.checkpoint.reader import open_folder
from harness.model.images import process_images
from harness.ops.load import LoadWarning, load, load_pretrained_model

ORACLE = Path(__file__).resolve().parent.parent / "fixtures" / "reference" / "original-llava"
MANIFEST = json.loads((ORACLE / "manifest.json").read_text())
IMAGES = load_file(str(ORACLE / "images.safetensors"))
FULL = [c for c in MANIFEST["cases"] if c["path"] == "full"]
LPM = [c for c in MANIFEST["cases"] if c["path"] == "load_pretrained_model"]


def _checkpoint(factory, name: str) -> Path:
    build = MANIFEST["checkpoints"][name]["build"]
    assert build["preset"] == "tiny"
    return factory(model=build["model"], checkpoint=build["checkpoint"])


def _pil(name: str):
    from PIL import Image

    return Image.fromarray(IMAGES[f"raw.{name}"].numpy(), mode="RGB")


def _pixels(names: list[str], processor, config) -> torch.Tensor:
    return process_images([_pil(n) for n in names], processor, config)


def _outputs(model, processor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for name, spec in MANIFEST["inputs"].items():
            ids = torch.tensor([spec["input_ids"]])
            images = _pixels(spec["images"], processor, model.config).to(dtype) \
                if spec["images"] else None
            # The original's logits come back float32 (transformers 4.37 upcasts); the values
            # are exact in the model's dtype, so ours are upcast the same way to compare.
            out[f"logits.{name}"] = model(input_ids=ids, images=images).logits.float()
    return out


def _load(path, base=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoadWarning)
        return load(path, base, "llava-tiny", device="cpu", **kw)


def test_image_preprocessing_is_identical(tiny_checkpoint_factory):
    from transformers import CLIPImageProcessor

    folder = _checkpoint(tiny_checkpoint_factory, FULL[0]["checkpoint"])
    processor = CLIPImageProcessor.from_pretrained(folder / "vision_tower")
    pad = type("Config", (), {"image_aspect_ratio": "pad"})()
    assert torch.equal(_pixels(["A"], processor, pad), IMAGES["pixels.pad.A"])
    assert torch.equal(_pixels(["A", "B"], processor, pad), IMAGES["pixels.pad.AB"])
    square = type("Config", (), {"image_aspect_ratio": None})()
    assert torch.equal(_pixels(["A"], processor, square), IMAGES["pixels.none.A"])


@pytest.mark.parametrize("case", FULL, ids=lambda c: c["id"])
def test_full_model_is_bit_identical_to_the_original(tiny_checkpoint_factory, case):
    folder = _checkpoint(tiny_checkpoint_factory, case["checkpoint"])
    dtype = getattr(torch, case["observed"]["model_dtype"])
    loaded = _load(folder, dtype=dtype, vision_tower_dtype=dtype)
    expected = load_file(str(ORACLE / case["file"]))
    ours = _outputs(loaded.model, loaded.image_processor, dtype)
    model = loaded.model
    with torch.no_grad():
        pixels = _pixels(["A"], loaded.image_processor, model.config).to(dtype)
        if "vision_features.A" in expected:
            ours["vision_features.A"] = model.get_vision_tower()(pixels).float()
            ours["image_features.A"] = model.encode_images(pixels).float()
        if "logits.one_image.square" in expected:
            square = IMAGES["pixels.none.A"].to(dtype)
            ids = torch.tensor([MANIFEST["inputs"]["one_image"]["input_ids"]])
            ours["logits.one_image.square"] = model(input_ids=ids, images=square).logits.float()
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor.float()), (
            f"{name}: max |diff| {(ours[name] - tensor.float()).abs().max().item():.3g}")


def _projector_folder(source: Path, out: Path) -> Path:
    out.mkdir()
    folder = open_folder(source)
    keys = [k for k in folder.tensors if k.startswith("model.mm_projector.")]
    torch.save(folder.read(keys), out / "mm_projector.bin")
    shutil.copy(source / "config.json", out / "config.json")
    return out


@pytest.mark.parametrize("case", LPM, ids=lambda c: c["id"])
def test_load_pretrained_model_paths_match_the_original(tiny_checkpoint_factory, tmp_path, case):
    folder = _checkpoint(tiny_checkpoint_factory, case["checkpoint"])
    if case["model_base"] is None:
        args = (str(folder), None, case["model_name"])
    else:
        base = _checkpoint(tiny_checkpoint_factory, case["model_base"])
        args = (str(_projector_folder(folder, tmp_path / "projector")), str(base),
                case["model_name"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoadWarning)
        _, model, processor, context_len = load_pretrained_model(*args, device="cpu")
    observed = case["observed"]
    assert str(model.dtype) == f"torch.{observed['model_dtype']}"
    assert str(model.get_vision_tower().dtype) == f"torch.{observed['vision_tower_dtype']}"
    assert context_len == case["context_len"]
    expected = load_file(str(ORACLE / case["file"]))
    ours = _outputs(model, processor, model.dtype)
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor.float()), (
            f"{name}: max |diff| {(ours[name] - tensor.float()).abs().max().item():.3g}")


def test_the_comparison_sees_a_one_ulp_change(tiny_checkpoint_factory):
    """The equality above is strict enough to fail on the smallest possible weight change."""
    case = FULL[0]
    folder = _checkpoint(tiny_checkpoint_factory, case["checkpoint"])
    loaded = _load(folder, dtype=torch.float32, vision_tower_dtype=torch.float32)
    weight = loaded.model.get_model().mm_projector[0].weight
    with torch.no_grad():
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1.0))
    ours = _outputs(loaded.model, loaded.image_processor, torch.float32)
    expected = load_file(str(ORACLE / case["file"]))
    assert not torch.equal(ours["logits.one_image"], expected["logits.one_image"])
    assert torch.equal(ours["logits.text_only"], expected["logits.text_only"])
