"""The harness's side of the oracle: the same checkpoints and inputs through `harness.model`.

`case_problems` loads one oracle case the way the original did (the full model in the case
dtype, or the original `load_pretrained_model` path), computes every tensor the oracle
recorded, and returns one line per tensor that does not match under the oracle's rule.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from ..checkpoint.reader import open_folder
from ..llava.keys import PROJECTOR_PREFIX
from ..model.anyres import grid_shape, pinpoints_of, select_best_resolution
from ..model.images import process_images
from .source import Oracle


def pil_image(oracle_images: dict, name: str):
    from PIL import Image  # heavy: PIL

    return Image.fromarray(oracle_images[f"raw.{name}"].numpy(), mode="RGB")


def pixels(oracle_images: dict, names: list[str], processor, config) -> torch.Tensor:
    return process_images([pil_image(oracle_images, n) for n in names], processor, config)


def input_logits(oracle: Oracle, images: dict, model, processor, dtype) -> dict:
    """`logits.<input>` for every input of the manifest, as the original computed them."""
    out = {}
    with torch.no_grad():
        for name, spec in oracle.manifest["inputs"].items():
            ids = torch.tensor([spec["input_ids"]])
            px = pixels(images, spec["images"], processor, model.config).to(dtype) \
                if spec["images"] else None
            # The original's logits come back float32 (transformers 4.37 upcasts); the values
            # are exact in the model's dtype, so ours are upcast the same way to compare.
            out[f"logits.{name}"] = model(input_ids=ids, images=px).logits.float()
    return out


def _quiet_load(*args, **kwargs):
    from ..ops.load import LoadWarning, load, load_pretrained_model  # heavy: transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoadWarning)
        if kwargs.pop("original_signature", False):
            return load_pretrained_model(*args, **kwargs)
        return load(*args, **kwargs)


def load_full(folder: Path, dtype: torch.dtype):
    return _quiet_load(folder, None, "llava-tiny", device="cpu", dtype=dtype,
                       vision_tower_dtype=dtype)


def full_outputs(oracle: Oracle, case: dict, folder: Path, loaded=None) -> dict:
    """Every tensor a full-model case recorded, computed by the harness (`loaded` may be
    passed in, e.g. a deliberately perturbed model)."""
    dtype = getattr(torch, case["observed"]["model_dtype"])
    images = oracle.images()
    loaded = loaded or load_full(folder, dtype)
    model, processor = loaded.model, loaded.image_processor
    ours = input_logits(oracle, images, model, processor, dtype)
    recorded = case["tensors"]
    with torch.no_grad():
        px = pixels(images, ["A"], processor, model.config).to(dtype)
        if "vision_features.A" in recorded:
            ours["vision_features.A"] = model.get_vision_tower()(px).float()
            ours["image_features.A"] = model.encode_images(px).float()
        if "logits.one_image.square" in recorded:
            square = images["pixels.none.A"].to(dtype)
            ids = torch.tensor([oracle.manifest["inputs"]["one_image"]["input_ids"]])
            ours["logits.one_image.square"] = model(input_ids=ids, images=square).logits.float()
    return ours


def next_pixels(images: dict, name: str, processor, config) -> torch.Tensor:
    """One image through the harness's preprocessing: [crops, 3, H, W] for anyres."""
    got = pixels(images, [name], processor, config)
    return got[0]


def next_outputs(oracle: Oracle, case: dict, folder: Path, loaded=None) -> dict:
    """Every tensor a LLaVA-1.6 case recorded (logits and spliced embeddings per input),
    computed by the harness; `loaded` may be a deliberately perturbed model."""
    dtype = getattr(torch, case["observed"]["model_dtype"])
    images = oracle.images()
    loaded = loaded or load_full(folder, dtype)
    model, processor = loaded.model, loaded.image_processor
    out = {}
    with torch.no_grad():
        for name, spec in oracle.manifest["next_inputs"].items():
            ids = torch.tensor(spec["input_ids"])
            mask = (torch.tensor(spec["attention_mask"], dtype=torch.bool)
                    if "attention_mask" in spec else None)
            px, sizes = None, None
            if spec["images"]:
                px = [next_pixels(images, n, processor, model.config).to(dtype)
                      for n in spec["images"]]
                sizes = [pil_image(images, n).size for n in spec["images"]]
            out[f"logits.{name}"] = model(input_ids=ids, attention_mask=mask, images=px,
                                          image_sizes=sizes).logits.float()
            if px is not None:
                out[f"embeds.{name}"] = model.prepare_multimodal(ids, None, mask, None, px,
                                                                 sizes)[0].float()
    return out


def next_preprocessing_problems(oracle: Oracle, case: dict, folder: Path,
                                loaded=None) -> list[str]:
    """The harness's grid choice and crops against LLaVA's, for every anyres image."""
    images = oracle.images()
    loaded = loaded or load_full(folder, getattr(torch, case["observed"]["model_dtype"]))
    config, problems = loaded.model.config, []
    aspect = config.image_aspect_ratio
    for name, choice in oracle.manifest["anyres_choices"].items():
        size = tuple(choice["size_wh"])
        if aspect == "anyres":
            pinpoints = pinpoints_of(config)
            ours = (list(select_best_resolution(size, pinpoints)),
                    list(grid_shape(size, pinpoints, loaded.model.get_vision_tower().image_size)))
            if ours != (choice["best_resolution_wh"], choice["grid_wh"]):
                problems.append(f"image {name} {size}: the harness picks {ours[0]} "
                                f"({ours[1][0]}x{ours[1][1]} crops), LLaVA "
                                f"{choice['best_resolution_wh']}")
        expected = images[f"pixels.{aspect}.{name}"]
        got = next_pixels(images, name, loaded.image_processor, config)
        if got.shape != expected.shape or not torch.equal(got, expected):
            problems.append(f"pixels.{aspect}.{name}: not identical to process_images "
                            f"({tuple(got.shape)} vs {tuple(expected.shape)})")
    return problems


def projector_folder(source: Path, out: Path) -> Path:
    """What LLaVA's stage-1 trainer writes: mm_projector.bin with the projector's tensors as
    stored, beside the checkpoint's config.json."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    folder = open_folder(source)
    keys = [k for k in folder.tensors if k.startswith(PROJECTOR_PREFIX)]
    torch.save(folder.read(keys), out / "mm_projector.bin")
    shutil.copy(source / "config.json", out / "config.json")
    return out


def lpm_outputs(oracle: Oracle, case: dict, folders: dict[str, Path], scratch: Path):
    """(problems with the loaded model's dtypes and context length, outputs) of a
    `load_pretrained_model` case through the harness's function of the same signature."""
    folder = folders[case["checkpoint"]]
    if case["model_base"] is None:
        args = (str(folder), None, case["model_name"])
    else:
        args = (str(projector_folder(folder, scratch / f"projector-{case['id']}")),
                str(folders[case["model_base"]]), case["model_name"])
    _, model, processor, context_len = _quiet_load(*args, device="cpu", original_signature=True)
    observed, problems = case["observed"], []
    for what, got in (("model_dtype", model.dtype),
                      ("vision_tower_dtype", model.get_vision_tower().dtype)):
        if str(got) != f"torch.{observed[what]}":
            problems.append(f"{case['id']}: {what} {got} != the original's {observed[what]}")
    if context_len != case["context_len"]:
        problems.append(f"{case['id']}: context_len {context_len} != {case['context_len']}")
    if case.get("inputs") == "next_inputs":
        loaded = SimpleNamespace(model=model, image_processor=processor)
        return problems, next_outputs(oracle, case, folder, loaded)
    return problems, input_logits(oracle, oracle.images(), model, processor, model.dtype)


def case_problems(oracle: Oracle, case: dict, folders: dict[str, Path], scratch: Path) -> list:
    """One line per difference between the harness and the oracle on `case`; [] = match."""
    if case["path"] == "full":
        problems, ours = [], full_outputs(oracle, case, folders[case["checkpoint"]])
    elif case["path"] == "next":
        loaded = load_full(folders[case["checkpoint"]],
                           getattr(torch, case["observed"]["model_dtype"]))
        problems = next_preprocessing_problems(oracle, case, folders[case["checkpoint"]],
                                               loaded)
        ours = next_outputs(oracle, case, folders[case["checkpoint"]], loaded)
    else:
        problems, ours = lpm_outputs(oracle, case, folders, scratch)
    dtype = getattr(torch, case["observed"]["model_dtype"])
    for name, expected in oracle.tensors(case).items():
        if name not in ours:
            problems.append(f"{name}: the harness computed no such tensor")
            continue
        line = oracle.mismatch(name, ours[name], expected, dtype)
        if line:
            problems.append(line)
    return problems
