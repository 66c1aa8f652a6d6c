"""Specs validate with messages that name field, value and rule; plans match the published
checkpoints' metadata (built independently here from Llama-2's key naming, not from the
harness's own layout code) and hold their invariants over every shard count and placement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.synth.layout import projector_tensors
from harness.synth.plan import make_plan
from harness.synth.presets import PRESET_NAMES, build_spec, preset
from harness.synth.specs import CheckpointSpec, SpecError, parse_size

REFERENCE = json.loads((Path(__file__).parents[1] / "fixtures/reference/llava-v1.5-7b.json")
                       .read_text())
LLAMA_LAYER_WEIGHTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                       "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                       "input_layernorm", "post_attention_layernorm")


def published_llava_keys(layers: int, projector_linears=(0, 2)) -> set[str]:
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(layers):
        keys |= {f"model.layers.{i}.{name}.weight" for name in LLAMA_LAYER_WEIGHTS}
        keys.add(f"model.layers.{i}.self_attn.rotary_emb.inv_freq")
    for j in projector_linears:
        keys |= {f"model.mm_projector.{j}.weight", f"model.mm_projector.{j}.bias"}
    return keys


# --- validation messages -----------------------------------------------------------------

@pytest.mark.parametrize("overrides, words", [
    ({"projector_type": "mlp0x_gelu"}, ["projector_type", "mlp0x_gelu", "mlp{N}x_gelu"]),
    ({"projector_type": "conv"}, ["projector_type", "'conv'"]),
    ({"dtype": "float8"}, ["dtype", "float8", "float16"]),
    ({"num_key_value_heads": 5}, ["num_key_value_heads", "5", "divide"]),
    ({"hidden_size": 0}, ["hidden_size", "0", "positive"]),
    ({"arch": "mpt"}, ["arch", "mpt", "llama"]),
    ({"projector_type": "identity"}, ["identity", "mm_hidden_size == hidden_size"]),
    ({"vision_image_size": 30}, ["image_size", "30", "patch_size"]),
    ({"colour": 1}, ["no field", "colour"]),
], ids=lambda v: "-".join(map(str, v)) if isinstance(v, dict) else None)
def test_model_spec_errors_name_field_value_and_rule(overrides, words):
    with pytest.raises(SpecError) as err:
        preset("tiny").model.replace(**overrides)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("fields, words", [
    ({"format": "gguf"}, ["format", "gguf", "safetensors"]),
    ({"placement": "top"}, ["placement", "top", "middle"]),
    ({"shards": 2, "max_shard_size": 10}, ["exactly one"]),
    ({"shards": 0, "max_shard_size": None}, ["shards", "positive"]),
    ({"seed": -1}, ["seed", "-1"]),
])
def test_checkpoint_spec_errors(fields, words):
    with pytest.raises(SpecError) as err:
        CheckpointSpec(**fields)
    for word in words:
        assert word in str(err.value)


def test_identity_projector_allowed_when_dims_match():
    spec = preset("tiny").model.replace(projector_type="identity", mm_hidden_size=64)
    assert spec.mm_hidden_size == spec.hidden_size == 64
    assert projector_tensors(spec) == []


@pytest.mark.parametrize("text, value", [("10GB", 10 * 10**9), ("5GiB", 5 * 2**30),
                                         ("500MB", 500 * 10**6), ("123", 123)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_naming_value():
    with pytest.raises(SpecError, match="'5XB'"):
        parse_size("5XB")


def test_unknown_preset_lists_the_allowed_ones():
    with pytest.raises(SpecError, match="llava-v1.5-7b"):
        preset("llava-v9")


def test_every_knob_overrides_a_preset():
    spec = build_spec("llava-v1.5-7b", model={"projector_type": "linear", "dtype": "bfloat16",
                                              "mm_hidden_size": 1152},
                      checkpoint={"format": "safetensors", "shards": 4, "seed": 7,
                                  "legacy_buffers": False, "placement": "first"})
    assert (spec.model.projector_type, spec.model.dtype, spec.model.mm_hidden_size) == \
        ("linear", "bfloat16", 1152)
    assert spec.checkpoint == CheckpointSpec(format="safetensors", shards=4,
                                             max_shard_size=None, placement="first",
                                             legacy_buffers=False, seed=7)


# --- published metadata ------------------------------------------------------------------

def test_7b_plan_reproduces_published_metadata():
    plan = make_plan(preset("llava-v1.5-7b"))
    assert plan.total_size == REFERENCE["total_size"] == 13_518_798_848
    assert {t.key for t in plan.tensors} == published_llava_keys(32)
    assert len(plan.tensors) == REFERENCE["tensor_count"]
    assert [s.name for s in plan.shards] == list(REFERENCE["shards"])
    first, second = ({t.key for t in s.tensors} for s in plan.shards)
    assert "model.embed_tokens.weight" in first and "model.layers.23.mlp.down_proj.weight" in first
    assert "model.layers.24.self_attn.q_proj.weight" in second
    assert {"model.norm.weight", "lm_head.weight", "model.mm_projector.2.bias"} <= second
    inv = [t for t in plan.tensors if t.key.endswith("inv_freq")]
    assert {t.dtype for t in inv} == {"float32"} and sum(t.nbytes for t in inv) == 8192
    lm = sum(t.numel for t in plan.tensors if t.group == "lm" and t.kind != "inv_freq")
    proj = sum(t.numel for t in plan.tensors if t.group == "projector")
    assert (lm, proj) == (REFERENCE["language_model_parameters"],
                          REFERENCE["projector_parameters"])
    assert plan.index()["metadata"] == {"total_size": REFERENCE["total_size"]}


def test_13b_plan_matches_llama2_13b_arithmetic():
    plan = make_plan(preset("llava-v1.5-13b"))
    h, m, layers, vocab = 5120, 13824, 40, 32000
    llama2_13b = 2 * vocab * h + layers * (4 * h * h + 3 * h * m + 2 * h) + h
    assert llama2_13b == 13_015_864_320
    projector = 1024 * h + h + h * h + h
    assert projector == 31_467_520  # the reference page's "~31.5M"
    assert plan.total_size == 2 * (llama2_13b + projector) + layers * 64 * 4
    assert {t.key for t in plan.tensors} == published_llava_keys(40)
    assert [s.name for s in plan.shards] == [f"pytorch_model-0000{i}-of-00003.bin"
                                            for i in (1, 2, 3)]


def test_mistral_preset_has_gqa_newline_and_tower_and_no_inv_freq():
    plan = make_plan(preset("llava-v1.6-mistral-7b"))
    keys = {t.key: t for t in plan.tensors}
    assert keys["model.layers.0.self_attn.k_proj.weight"].shape == (8 * 128, 4096)
    assert "model.image_newline" in keys
    assert not any(k.endswith("inv_freq") for k in keys)
    tower = [k for k in keys if k.startswith("model.vision_tower.vision_tower.vision_model.")]
    assert len(tower) > 300
    assert all(s.name.endswith(".safetensors") for s in plan.shards)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_plans(name):
    plan = make_plan(preset(name))
    assert plan.total_size == sum(t.nbytes for t in plan.tensors)


# --- plan invariants over shard counts and placements --------------------------------------

PROJECTORS = st.sampled_from(["linear", "mlp1x_gelu", "mlp2x_gelu", "mlp3x_gelu", "identity"])


@given(shards=st.integers(1, 8), placement=st.sampled_from(["last", "first", "middle", "split"]),
       projector=PROJECTORS, fmt=st.sampled_from(["bin", "safetensors"]),
       legacy=st.booleans())
def test_plan_invariants(shards, placement, projector, fmt, legacy):
    model = {"projector_type": projector}
    if projector == "identity":
        model["mm_hidden_size"] = 64
    try:
        spec = build_spec("tiny", model=model, checkpoint={
            "shards": shards, "placement": placement, "format": fmt, "legacy_buffers": legacy})
        plan = make_plan(spec)
    except SpecError as exc:
        # Only placements that cannot exist for this layout may be refused.
        assert (placement == "middle" and shards < 3) or (placement == "split" and (
            shards < 2 or projector == "identity")), exc
        return
    assert len(plan.shards) == shards and all(s.tensors for s in plan.shards)
    keys = [t.key for t in plan.tensors]
    assert len(keys) == len(set(keys))
    proj_shards = [i for i, s in enumerate(plan.shards)
                   if any(t.group == "projector" for t in s.tensors)]
    expected = {"last": [shards - 1], "first": [0], "middle": [shards // 2],
                "split": [shards - 2, shards - 1]}[placement]
    assert proj_shards == ([] if projector == "identity" else expected)
    index = plan.index()
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in plan.tensors)
    assert set(index["weight_map"]) == set(keys)
    assert any(k.endswith("inv_freq") for k in keys) == legacy
