"""Projector parameter counts: the formula, the module built on the meta device and the tensor
shapes on disk (file headers; the planned layout for presets) agree for every projector type,
every preset and a hypothesis range of dims; the published figures come out exactly; the type
in config.json must match the type the tensors describe; stage-1 freezing leaves exactly the
projector's count trainable.

Stage-1 training in miniature lives with the LLaVA model classes; these counts are what its
trainable-parameter checks compare against (`trainable_params(model) == projector_params(...)`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from harness.cli.app import main
from harness.model.projector import build_projector
from harness.cli.commands.count import count_preset
from harness.llava.errors import ContractError
from harness.llava.projector import infer_projector, projector_params
from harness.ops.counts import count_checkpoint, module_params, trainable_params
from harness.synth.builder import build
from harness.synth.presets import PRESET_NAMES, build_spec

REFERENCE = Path(__file__).resolve().parent.parent / "fixtures" / "reference"
# The figures the published models and LLaVA's wiki give.
LLAVA_7B_PROJECTOR = 20_979_712  # mlp2x_gelu 1024 -> 4096
LLAVA_13B_PROJECTOR = 31_467_520  # mlp2x_gelu 1024 -> 5120, the wiki's "~31.5M"
DISK_TYPES = ("linear", "mlp1x_gelu", "mlp2x_gelu", "mlp3x_gelu", "mlp5x_gelu", "identity")


def bare_spec(model: dict | None = None, **checkpoint):
    return dataclasses.replace(build_spec("tiny", model=model, checkpoint=checkpoint or None),
                               with_tokenizer=False, with_vision_tower=False)


def meta_shapes(projector_type: str, m: int, h: int) -> dict[str, tuple[int, ...]]:
    """The keys and shapes a checkpoint holds for this projector (no memory: meta device)."""
    with torch.device("meta"):
        module = build_projector(projector_type, m, h)
    return {f"model.mm_projector.{k}": tuple(v.shape) for k, v in module.state_dict().items()}


# --- the published figures -----------------------------------------------------------------

def test_13b_figure_from_the_wiki_comes_out_exactly():
    # The wiki's own arithmetic: d_v*d_l + d_l + d_l*d_l + d_l with d_v 1024, d_l 5120.
    assert 1024 * 5120 + 5120 + 5120 * 5120 + 5120 == LLAVA_13B_PROJECTOR
    assert projector_params("mlp2x_gelu", 1024, 5120) == LLAVA_13B_PROJECTOR
    assert round(LLAVA_13B_PROJECTOR / 1e6, 1) == 31.5
    counts = count_preset("llava-v1.5-13b")
    assert (counts.formula, counts.module, counts.tensors) == (LLAVA_13B_PROJECTOR,) * 3


def test_7b_figures_match_the_published_checkpoint():
    ref = json.loads((REFERENCE / "llava-v1.5-7b.json").read_text())
    counts = count_preset("llava-v1.5-7b")
    assert counts.formula == counts.module == counts.tensors == LLAVA_7B_PROJECTOR \
        == ref["projector_parameters"]
    assert counts.params["language_model"] == ref["language_model_parameters"]
    # fp16 parameters + float32 legacy inv_freq buffers = the index's total_size.
    assert 2 * counts.total_params + 4 * counts.buffer_elements == ref["total_size"]
    assert counts.trainable_stage1 == LLAVA_7B_PROJECTOR


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_three_ways(name):
    counts = count_preset(name)
    spec = build_spec(name).model
    assert counts.agree and counts.projector_type == counts.inferred_type == spec.projector_type
    assert (counts.mm_hidden_size, counts.hidden_size) == (spec.mm_hidden_size,
                                                           spec.hidden_size)


# --- formula == module for every type and a range of dims -------------------------------------

@pytest.mark.parametrize("m, h, expected", [(1024, 4096, 4_198_400), (1152, 4096, 4_722_688),
                                            (1664, 5120, 8_524_800), (4096, 4096, 16_781_312)],
                         ids=["clip-l-7b", "siglip-7b", "eva-13b", "square"])
def test_linear_for_common_vision_widths(m, h, expected):
    assert projector_params("linear", m, h) == module_params("linear", m, h) == expected


def test_identity_needs_equal_widths():
    assert projector_params("identity", 4096, 4096) == module_params("identity", 4096, 4096) == 0
    with pytest.raises(ContractError, match="needs mm_hidden_size == hidden_size, got 1024 != 4096"):
        projector_params("identity", 1024, 4096)


def _few(fn):
    if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci":
        return settings(max_examples=25)(fn)  # meta-device modules: cheap
    return fn


@st.composite
def projectors(draw):
    kind = draw(st.sampled_from(("linear", "identity", "mlp")))
    m = draw(st.one_of(st.sampled_from((1024, 1152, 1664, 768)), st.integers(1, 8192)))
    h = m if kind == "identity" else draw(st.integers(1, 8192))
    if kind == "mlp":
        kind = f"mlp{draw(st.integers(1, 8))}x_gelu"
    return kind, m, h


@_few
@given(case=projectors())
def test_formula_equals_module_and_inference_round_trips(case):
    kind, m, h = case
    shapes = meta_shapes(kind, m, h)
    assert projector_params(kind, m, h) == module_params(kind, m, h) \
        == sum(torch.Size(s).numel() for s in shapes.values())
    inferred = infer_projector(shapes, "meta")
    assert inferred.type == kind
    if kind != "identity":
        assert (inferred.mm_hidden_size, inferred.hidden_size) == (m, h)


# --- on disk: file headers ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("counts"), {}

    def get(projector: str, fmt: str = "bin") -> Path:
        if (projector, fmt) not in cache:
            model = {"projector_type": projector}
            if projector == "identity":
                model["mm_hidden_size"] = 64  # == hidden_size, as identity requires
            folder = root / f"{projector}-{fmt}"
            build(bare_spec(model, format=fmt, shards=3), folder)
            cache[(projector, fmt)] = folder
        return cache[(projector, fmt)]

    return get


@pytest.mark.parametrize("fmt", ("bin", "safetensors"))
@pytest.mark.parametrize("projector", DISK_TYPES)
def test_every_type_on_disk_three_ways(disk, projector, fmt):
    counts = count_checkpoint(disk(projector, fmt))
    model = bare_spec({"projector_type": projector,
                       **({"mm_hidden_size": 64} if projector == "identity" else {})}).model
    assert counts.projector_type == counts.inferred_type == projector
    assert counts.formula == counts.module == counts.tensors \
        == projector_params(projector, model.mm_hidden_size, model.hidden_size)
    assert counts.to_dict()["projector_params"]["file_headers"] == counts.tensors


def test_llava_next_counts_its_newline_and_stored_tower_apart(tmp_path):
    """A LLaVA-1.6 checkpoint on disk: image_newline and the stored tower are their own
    groups, the projector's three counts agree, and the groups add up to every tensor."""
    from transformers import CLIPVisionModel

    folder = tmp_path / "next"
    build(build_spec("tiny-next"), folder)
    counts = count_checkpoint(folder).to_dict()
    model = build_spec("tiny-next").model
    tower = CLIPVisionModel.from_pretrained(folder / "vision_tower")
    params = counts["params"]
    assert params["image_newline"] == model.hidden_size
    assert params["vision_tower"] == sum(p.numel() for p in tower.parameters())
    assert params["projector"] == projector_params("mlp2x_gelu", model.mm_hidden_size,
                                                   model.hidden_size)
    assert params["total"] == sum(v for k, v in params.items() if k != "total")
    assert counts["agree"] is True


def test_llava_v1_6_mistral_7b_adds_up_to_the_published_size():
    """Mistral-7B (7,241,732,096) + CLIP ViT-L/14-336 (303,507,456) + the mlp2x projector
    (20,979,712) + image_newline (4,096) = 7,566,223,360: the hub's "7.57B params"."""
    params = count_preset("llava-v1.6-mistral-7b").to_dict()["params"]
    assert params == {"language_model": 7_241_732_096, "vision_tower": 303_507_456,
                      "projector": 20_979_712, "image_newline": 4_096,
                      "total": 7_566_223_360}


def test_count_cli(disk, capsys):
    folder = disk("mlp2x_gelu")
    assert main(["count", str(folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["projector_params"] == {"formula": 6272, "module": 6272, "file_headers": 6272}
    assert data["trainable_stage1"] == 6272 and data["agree"] is True
    assert main(["count", "--preset", "llava-v1.5-13b"]) == 0
    assert "31,467,520" in capsys.readouterr().out


# --- config and tensors must agree ------------------------------------------------------------

@pytest.fixture
def editable(tmp_path):
    folder = tmp_path / "c"
    build(bare_spec(format="safetensors", shards=2), folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def refused(capsys, folder: Path) -> str:
    code = main(["count", str(folder)])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and err.startswith("llava-harness: error: "), err
    return err


def test_clean_checkpoint_counts(editable):
    assert count_checkpoint(editable).agree


def test_missing_type_is_the_silent_linear_fallback(editable, capsys):
    edit_config(editable, mm_projector_type=None)
    err = refused(capsys, editable)
    assert f"{editable / 'config.json'}: has no mm_projector_type, so LLaVA's builder " \
           "silently builds 'linear', but the tensors" in err and "'mlp2x_gelu'" in err


def test_config_type_disagrees_with_tensors(editable, capsys):
    edit_config(editable, mm_projector_type="mlp3x_gelu")
    assert "says 'mlp3x_gelu', but the tensors" in refused(capsys, editable)


def test_config_dims_disagree_with_tensors(editable, capsys):
    edit_config(editable, mm_hidden_size=48)
    assert "mm_hidden_size 48 -> hidden_size 64, but the projector tensors map 32 -> 64" \
        in refused(capsys, editable)


def test_missing_config(editable, capsys):
    (editable / "config.json").unlink()
    assert "config.json: missing" in refused(capsys, editable)


def test_a_wrong_shape_on_disk_is_named(editable, capsys):
    shard = editable / "model-00002-of-00002.safetensors"
    state = load_file(shard)
    state["model.mm_projector.2.weight"] = state["model.mm_projector.2.weight"][:, :63].clone()
    save_file(state, shard, metadata={"format": "pt"})
    assert "mm_projector.2.weight has shape [64, 63]; an mlp2x_gelu layer mapping 64 -> 64 " \
           "needs [64, 64]" in refused(capsys, editable)


@pytest.mark.parametrize("keys, phrase", [
    ({"0.weight": (8, 4), "0.bias": (8,), "1.weight": (8, 8)}, "'1.weight' fits no known"),
    ({"0.weight": (8, 4), "0.bias": (8,), "4.weight": (8, 8), "4.bias": (8,)},
     "projector layer 2 is missing"),
    ({"weight": (8, 4)}, "'weight' fits no known"),
    ({"0.weight": (8, 4)}, "mm_projector.0.bias is missing"),
], ids=["odd-index", "gap", "linear-without-bias", "mlp-without-bias"])
def test_inference_rejects_unknown_structures(keys, phrase):
    shapes = {f"model.mm_projector.{k}": v for k, v in keys.items()}
    with pytest.raises(ContractError, match=phrase):
        infer_projector(shapes, "x")


# --- stage-1 freezing: exactly the projector trainable ----------------------------------------

class _Stage1Stand(nn.Module):
    """Enough of a LLaVA model for the freezing rule: an LM, a tower and the projector."""

    def __init__(self, projector_type: str, m: int, h: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(32000, h)
        self.layers = nn.ModuleList(nn.Linear(h, h) for _ in range(2))
        self.vision_tower = nn.Linear(m, m)
        self.mm_projector = build_projector(projector_type, m, h)


def stage1_freeze(model: nn.Module, unfreeze=("mm_projector",)) -> nn.Module:
    """train.py with --tune_mm_mlp_adapter: freeze everything, then unfreeze the projector."""
    model.requires_grad_(False)
    for name in unfreeze:
        getattr(model, name).requires_grad_(True)
    return model


@pytest.mark.parametrize("projector", ("linear", "mlp2x_gelu", "mlp3x_gelu"))
def test_stage1_trainable_count_is_the_projector_count(projector):
    with torch.device("meta"):
        model = stage1_freeze(_Stage1Stand(projector, 1024, 4096))
    assert trainable_params(model) == projector_params(projector, 1024, 4096)


def test_stage1_count_check_catches_a_wrong_freeze():
    with torch.device("meta"):
        leaky = stage1_freeze(_Stage1Stand("mlp2x_gelu", 1024, 4096),
                              unfreeze=("mm_projector", "vision_tower"))
        frozen = stage1_freeze(_Stage1Stand("mlp2x_gelu", 1024, 4096), unfreeze=())
    assert trainable_params(leaky) != LLAVA_7B_PROJECTOR
    assert trainable_params(frozen) == 0


# --- real size: counts from the headers of the cached 7B ----------------------------------------

@pytest.mark.realsize
@pytest.mark.parametrize("fmt", ("bin", "safetensors"))
def test_realsize_7b_counts_from_headers(realsize_checkpoint_factory, fmt):
    folder = realsize_checkpoint_factory("llava-v1.5-7b", checkpoint={"format": fmt})
    counts = count_checkpoint(folder)
    assert counts.agree and counts.tensors == LLAVA_7B_PROJECTOR
    assert counts.total_params == count_preset("llava-v1.5-7b").total_params
