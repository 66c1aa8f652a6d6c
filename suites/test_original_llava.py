"""The harness's LLaVA model against LLaVA's own code.

The oracle is what haotian-liu/LLaVA's released code (the `llava-torch` wheel, under its
pinned transformers 4.37) computes on tiny checkpoints this harness's builder makes
deterministically: every dtype (float32, float16, bfloat16), both architectures, both formats,
every projector type, and the original's `load_pretrained_model` paths, on one image, two
images and text only. Each test runs against every oracle there is:

- `live`: computed on this machine (`llava-harness oracle setup` makes its environment): the
  harness must match it bit for bit, on any CPU;
- `stored:<machine>`: a committed copy (`fixtures/reference/original-llava/<machine>/`): bit
  for bit on a machine with the fingerprint of the one that made it, elsewhere within the
  `[oracle.cross_machine]` ulp bounds of `fixtures/tolerances.toml`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPImageProcessor

from harness.model import anyres
from harness.oracle import cases
from harness.checkpoint.identity import EXTRA, differences, folder_identity
from harness.oracle.replay import case_problems, full_outputs, load_full, pixels
from harness.oracle.source import mismatch, stored_names, ulp_at_scale, ulps_apart
from harness.tolerances import tolerance

ORACLES = ["live"] + [f"stored:{name}" for name in stored_names()]
oracles = pytest.mark.parametrize("llava_oracle", ORACLES, indirect=True)


@oracles
def test_image_preprocessing_is_identical(llava_oracle, llava_oracle_folders):
    """Pixels are not arithmetic the CPU changes: identical against every oracle."""
    images = llava_oracle.images()
    folder = llava_oracle_folders[cases.MAIN_CASE]
    processor = CLIPImageProcessor.from_pretrained(folder / "vision_tower")
    pad = type("Config", (), {"image_aspect_ratio": "pad"})()
    assert torch.equal(pixels(images, ["A"], processor, pad), images["pixels.pad.A"])
    assert torch.equal(pixels(images, ["A", "B"], processor, pad), images["pixels.pad.AB"])
    square = type("Config", (), {"image_aspect_ratio": None})()
    assert torch.equal(pixels(images, ["A"], processor, square), images["pixels.none.A"])


@oracles
def test_the_checkpoints_are_the_ones_the_oracle_read(llava_oracle, llava_oracle_folders):
    """Every rebuilt checkpoint is the one the oracle was computed from: the same tensors'
    bytes and the same configuration meaning (what a library stamps on a save is not part of
    it). The first stored copy recorded no config.json files: a file it never recorded is
    not held against the rebuild there."""
    partial = llava_oracle.manifest["format_version"] < 2
    problems = []
    for cid, entry in llava_oracle.manifest["checkpoints"].items():
        found = folder_identity(llava_oracle_folders[cid])
        problems += [f"{cid}: {d}" for d in differences(entry["identity"], found)
                     if not (partial and d.change == EXTRA)]
    assert not problems, "rebuilt checkpoints differ from the ones the oracle read:\n" + \
        "\n".join(problems)


@oracles
@pytest.mark.parametrize("case_id", cases.case_ids())
def test_the_harness_matches_the_original(llava_oracle, llava_oracle_folders, tmp_path,
                                          case_id):
    case = llava_oracle.case(case_id)
    assert case is not None, f"{llava_oracle.folder}: the oracle has no case {case_id}"
    problems = case_problems(llava_oracle, case, llava_oracle_folders, tmp_path)
    assert not problems, f"{llava_oracle.describe()}:\n" + "\n".join(problems)


@oracles
def test_the_original_fails_where_it_is_known_to(llava_oracle):
    """LLaVA #1075: a projector folder whose config.json has the published model_type
    "llava" breaks the original's projector-only path; the oracle records it, not a result."""
    failed = {f["id"]: f["error"] for f in llava_oracle.manifest["failures"]}
    assert set(failed) == set(cases.EXPECTED_FAILURES)
    assert all("attention_dropout" in error for error in failed.values())


@oracles
def test_the_comparison_sees_a_one_ulp_change(llava_oracle, llava_oracle_folders):
    """A one-ulp change of one projector weight moves the image logits. Where the oracle is
    compared bit for bit that alone must fail the comparison. Across machines the change is
    far below the arithmetic noise, so there the bound must instead catch anything just past
    it, and a realistic defect (the projector's GELU in its tanh approximation)."""
    case = llava_oracle.case(cases.MAIN_CASE)
    folder = llava_oracle_folders[case["checkpoint"]]
    expected = llava_oracle.tensors(case)
    loaded = load_full(folder, torch.float32)
    clean = full_outputs(llava_oracle, case, folder, loaded)
    weight = loaded.model.get_model().mm_projector[0].weight
    with torch.no_grad():
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1.0))
    bumped = full_outputs(llava_oracle, case, folder, loaded)
    # On this machine, bit for bit: the change reaches the image logits and nothing else.
    assert not torch.equal(bumped["logits.one_image"], clean["logits.one_image"])
    assert torch.equal(bumped["logits.text_only"], clean["logits.text_only"])
    name = "logits.one_image"
    if llava_oracle.exact:
        assert llava_oracle.mismatch(name, bumped[name], expected[name], torch.float32)
        assert llava_oracle.mismatch("logits.text_only", bumped["logits.text_only"],
                                     expected["logits.text_only"], torch.float32) is None
        return
    bound = tolerance("oracle.cross_machine.float32").ulps
    over = expected[name].clone()
    over.view(-1)[7] += (bound + 1) * ulp_at_scale(expected[name], torch.float32)
    assert llava_oracle.mismatch(name, over, expected[name], torch.float32)
    with torch.no_grad():
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(-1.0))  # undo the bump
    loaded.model.get_model().mm_projector[1].approximate = "tanh"
    defect = full_outputs(llava_oracle, case, folder, loaded)
    assert llava_oracle.mismatch(name, defect[name], expected[name], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_ulps_are_counted_at_the_tensors_scale(dtype):
    """The cross-machine bound in its own units: k ulps at the tensor's largest |value|."""
    expected = torch.tensor([0.75, -0.01, 0.0, 0.3], dtype=dtype).float()
    ulp = ulp_at_scale(expected, dtype)
    assert ulp == torch.finfo(dtype).eps / 2  # 0.75 lies in [0.5, 1)
    bound = tolerance(f"oracle.cross_machine.{str(dtype).removeprefix('torch.')}").ulps
    for k, ok in ((bound, True), (bound + 1, False)):
        ours = expected.clone()
        ours[2] += k * ulp  # at a value near zero: its own ulp would call this huge
        assert ulps_apart(ours, expected, dtype) == pytest.approx(k)
        assert (mismatch("t", ours, expected, dtype, exact=False) is None) is ok
        assert mismatch("t", ours, expected, dtype, exact=True) is not None
    assert mismatch("t", expected, expected, dtype, exact=True) is None
    assert "shape" in mismatch("t", expected[:2], expected, dtype, exact=False)


# --- LLaVA-1.6 (NeXT): anyres multi-crop images ---------------------------------------------
# Computed by the live oracle only: the stored copies predate these cases.

live_only = pytest.mark.parametrize("llava_oracle", ["live"], indirect=True)
NEXT_MAIN = "next-llama-anyres-spatial_unpad-float32-safetensors"


@live_only
@pytest.mark.parametrize("case_id", cases.next_case_ids())
def test_llava_next_matches_the_original(llava_oracle, llava_oracle_folders, tmp_path,
                                         case_id):
    """Grid choice, crops, spliced embeddings and logits of every anyres input (each image
    shape alone, all in one row, a padded batch mixing them, text only), bit for bit."""
    case = llava_oracle.case(case_id)
    assert case is not None, f"{llava_oracle.folder}: the oracle has no case {case_id}"
    problems = case_problems(llava_oracle, case, llava_oracle_folders, tmp_path)
    assert not problems, f"{llava_oracle.describe()}:\n" + "\n".join(problems)


@live_only
def test_the_anyres_images_make_llava_use_every_pinpoint(llava_oracle):
    """LLaVA's own choices: every tiny pinpoint is picked by some image, and the image smaller
    than one crop is the tie the first pinpoint wins."""
    choices = llava_oracle.manifest["anyres_choices"]
    picked = {tuple(c["best_resolution_wh"]) for c in choices.values()}
    assert picked == {tuple(p) for p in cases.next_pinpoints()}
    assert choices["small"]["best_resolution_wh"] == cases.next_pinpoints()[0]
    assert llava_oracle.case(NEXT_MAIN)["observed"]["unfreeze_mm_vision_tower"] is True


REAL_SELECT, REAL_MERGE = anyres.select_best_resolution, anyres.merge_crops


def _hf_order_choice(size, pinpoints):
    """A planted defect: the pinpoints read as llava-hf writes them, (height, width)."""
    return REAL_SELECT(size, [(h, w) for w, h in pinpoints])


def _unpad_exactly(features, size):
    """A planted defect: keep exactly the rows the image fills (the original keeps one more
    when the padding is odd)."""
    width, height = size
    grid_h, grid_w = features.shape[1:]
    if width / height > grid_w / grid_h:
        filled = int(height * (grid_w / width))
        start = (grid_h - filled) // 2
        return features[:, start:start + filled, :]
    filled = int(width * (grid_h / height))
    start = (grid_w - filled) // 2
    return features[:, :, start:start + filled]


def _no_last_newline(features, *args):
    """A planted defect: the last row of an anyres grid lacks its image_newline."""
    merged = REAL_MERGE(features, *args)
    return merged[:-1] if features.shape[0] > 1 else merged


def _inputs_holding(images: set[str]) -> set[str]:
    return {name for name, spec in cases.NEXT_INPUTS.items() if images & set(spec["images"])}


def _odd_padding_images() -> set[str]:
    """The anyres images whose padded feature grid has an odd number of padding rows or
    columns (2x2 patches per crop in the tiny tower)."""
    odd = set()
    for name, size in cases.NEXT_IMAGE_SIZES.items():
        columns, rows = anyres.grid_shape(size, cases.next_pinpoints(), cases.next_crop_side())
        grid = torch.zeros(1, 2 * rows, 2 * columns)
        if anyres.unpad(grid, size).shape != _unpad_exactly(grid, size).shape:
            odd.add(name)
    return odd


DEFECTS = {
    # name: (module, what to patch in it, the replacement, the inputs that must now differ)
    "pinpoints-as-height-width": ("harness.model.anyres", "select_best_resolution",
                                  _hf_order_choice, _inputs_holding({"small"})),
    "unpad-without-the-odd-row": ("harness.model.anyres", "unpad", _unpad_exactly,
                                  _inputs_holding(_odd_padding_images())),
    "missing-newline-row": ("harness.model.llava", "merge_crops", _no_last_newline,
                            _inputs_holding(set(cases.NEXT_IMAGE_SIZES))),
    # LLaVA-1.6 runs the tuned tower stored in the checkpoint, not the one in its folder.
    "folder-tower-instead-of-stored": ("harness.ops.load", "_load_stored_tower",
                                       lambda model, folder: False,
                                       _inputs_holding(set(cases.NEXT_IMAGE_SIZES))),
}


def test_the_planted_unpad_defect_has_images_to_show_it():
    assert {"wide", "small"} <= _odd_padding_images() < set(cases.NEXT_IMAGE_SIZES)


@live_only
@pytest.mark.parametrize("defect", DEFECTS)
def test_the_next_comparison_catches_planted_defects(llava_oracle, llava_oracle_folders,
                                                     monkeypatch, defect):
    """Each defect changes exactly the inputs it should, and the comparison says so; the
    text-only logits still match bit for bit."""
    import importlib

    from harness.oracle.replay import next_outputs, next_preprocessing_problems

    case = llava_oracle.case(NEXT_MAIN)
    folder = llava_oracle_folders[case["checkpoint"]]
    expected = llava_oracle.tensors(case)
    module, target, replacement, differing = DEFECTS[defect]
    monkeypatch.setattr(importlib.import_module(module), target, replacement)
    loaded = load_full(folder, torch.float32)
    ours = next_outputs(llava_oracle, case, folder, loaded)
    caught = {name.split(".", 1)[1] for name in expected
              if llava_oracle.mismatch(name, ours[name], expected[name], torch.float32)}
    assert caught == differing
    assert torch.equal(ours["logits.text_only"], expected["logits.text_only"])
    if target == "select_best_resolution":
        problems = next_preprocessing_problems(llava_oracle, case, folder, loaded)
        assert any("image small" in line for line in problems), problems
