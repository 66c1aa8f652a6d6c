"""`verify-release`: a release whose artifacts were made by the tools users use verifies clean,
and every planted fault is caught with a message naming the tensor and the size of the
difference.

The release (tiny-quant: a tiny LLaVA whose MLP bitsandbytes' CPU 4-bit kernel can pack):
- adapter: a LLaVA LoRA trained (randomized) on the base, saved the LLaVA way;
- merged: LLaVA's way, `PeftModel.from_pretrained(...).merge_and_unload()` + `save_pretrained`;
- hf: the harness's conversion, loaded into transformers' LlavaForConditionalGeneration and saved
  again with its `save_pretrained` (transformers 5's own key spelling);
- llama: a naive strip, the state dict filtered by hand and saved with safetensors;
- nf4: `from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4, double quant))` +
  `save_pretrained`, as users publish "-4bit" folders;
- projector / pretrain: the merged model's projector extracted, and the base's (what stage 2
  started from).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.cli.app import main
from harness.llava.config import language_model_fields
from harness.llava.keys import is_language_model_key
from harness.llava.kinds import LM_SIDE_FILES
from harness.release.manifest import ManifestError, read_manifest
from harness.release.verify import verify_release
from harness.synth.builder import build
from harness.synth.presets import build_spec

DTYPE = "float32"
ALL_RELATIONS = {"merged": "merge(base, adapter)", "hf": "convert(merged)",
                 "llama": "strip(merged)", "nf4": "quantize(merged, nf4-dq)",
                 "projector": "extract(merged)", "pretrain": "stage1(merged)"}


# --- making the artifacts with other tools ---------------------------------------------------

def _adapter(base: Path, out: Path, alpha: float = 8) -> Path:
    from harness.ops.load import load
    from harness.ops.lora import LoraSpec, apply_lora, randomize_adapter, save_llava_lora

    loaded = load(base, device="cpu", dtype=DTYPE)
    peft_model = apply_lora(loaded.model, LoraSpec(r=4, alpha=alpha))
    randomize_adapter(peft_model, 0)
    return save_llava_lora(peft_model, out)


def peft_merge(base: Path, adapter: Path, out: Path) -> Path:
    """LLaVA's scripts/merge_lora_weights.py: load the base with the adapter folder's config,
    the non-LoRA trainables in, PeftModel, merge_and_unload, save_pretrained."""
    from peft import PeftModel

    from harness.model.config import llava_config
    from harness.model.llava import MODEL_CLASSES
    from harness.ops.load import normalise_trainable_keys

    arch, config = llava_config(adapter)
    model = MODEL_CLASSES[arch].from_pretrained(base, config=config, dtype=torch.float32)
    state = model.state_dict()
    raw = torch.load(adapter / "non_lora_trainables.bin", weights_only=True)
    with torch.no_grad():
        for key, value in normalise_trainable_keys(raw, set(state), adapter).items():
            state[key].copy_(value.to(state[key].dtype))
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    for name in LM_SIDE_FILES:  # the script saves the base's tokenizer beside the model
        if (base / name).is_file():
            shutil.copy(base / name, out / name)
    return out


def transformers_hf(merged: Path, out: Path, work: Path) -> Path:
    """The harness's conversion, then transformers' own load and save of it."""
    from transformers import LlavaForConditionalGeneration

    from harness.ops.convert import convert

    convert(merged, work / "converted", "hf")
    LlavaForConditionalGeneration.from_pretrained(work / "converted").save_pretrained(out)
    return out


def naive_strip(merged: Path, out: Path) -> Path:
    """By hand: every shard loaded, the multimodal keys dropped, one file saved."""
    state = {}
    for shard in sorted(merged.glob("*.safetensors")):
        state.update(load_file(shard))
    out.mkdir()
    save_file({k: v for k, v in state.items() if is_language_model_key(k)},
              out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((merged / "config.json").read_text())
    plain = {**language_model_fields(config), "model_type": "llama",
             "architectures": ["LlamaForCausalLM"]}
    (out / "config.json").write_text(json.dumps(plain, indent=2))
    return out


def bnb_save(merged: Path, out: Path) -> Path:
    """A 4-bit load (NF4, double quant) and save_pretrained."""
    from harness.ops.load import load
    from harness.ops.quant import bnb_config

    loaded = load(merged, None, "llava-merged", device="cpu", dtype=torch.float32,
                  quantization_config=bnb_config("nf4-dq", "float32"))
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return out


def extracted(folder: Path, out: Path) -> Path:
    from harness.ops.extract import extract

    extract(folder, out)
    return out


def write_manifest(root: Path, artifacts: dict[str, Path], made: dict[str, str]) -> Path:
    lines = ["[artifacts]"] + [f'{k} = "{v}"' for k, v in artifacts.items()] + \
        ["", "[made]"] + [f'{k} = "{v}"' for k, v in made.items()]
    path = root / "release.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("release")
    base = root / "llava-base"
    build(build_spec("tiny-quant", checkpoint={"format": "safetensors"}), base)
    a = {"base": base, "adapter": _adapter(base, root / "llava-lora")}
    a["merged"] = peft_merge(base, a["adapter"], root / "llava-merged")
    # save_pretrained writes no mm_vision_tower folder of its own: keep the base's.
    a["hf"] = transformers_hf(a["merged"], root / "llava-hf", root)
    a["llama"] = naive_strip(a["merged"], root / "vicuna")
    a["nf4"] = bnb_save(a["merged"], root / "llava-nf4")
    a["projector"] = extracted(a["merged"], root / "mm_projector.bin")
    a["pretrain"] = extracted(base, root / "stage1" / "mm_projector.bin")
    return a


def verdicts(manifest: Path) -> dict[str, tuple[bool, list[str], list[str]]]:
    report = verify_release(manifest)
    return {o.relation.target: (o.ok, o.faults, o.notes) for o in report.outcomes}


# --- a release made by other tools verifies clean ---------------------------------------------

def test_a_release_made_by_other_tools_verifies_clean(release, tmp_path):
    manifest = write_manifest(tmp_path, release, ALL_RELATIONS)
    report = verify_release(manifest)
    assert {str(o.relation): (o.ok, o.faults) for o in report.outcomes} == \
        {str(o.relation): (True, []) for o in report.outcomes}
    by = {o.relation.target: o for o in report.outcomes}
    merge = by["merged"].figures
    # peft's merge on this CPU: bit-identical to the harness's arithmetic, tensor for tensor.
    assert merge["identical"] == merge["tensors"] and merge["changed_by_adapter"] > 0
    assert by["hf"].figures["identical"] == by["hf"].figures["tensors"]
    assert any("row(s) of image and pad tokens" in n for n in by["hf"].notes)
    assert by["nf4"].figures["quantized"] > 0
    # the logit probe ran (a tiny folder, local tower, tokenizer saved beside it) and is inside
    # [release.quantize.logits.nf4-dq]
    assert 0 < by["nf4"].figures["logit_drift"] <= 0.3
    assert by["nf4"].figures["top1_agreement"] >= 0.5
    assert 0 < by["pretrain"].figures["max_relative_change"]


def test_the_command_prints_each_relation_and_exits_0(release, tmp_path, capsys):
    manifest = write_manifest(tmp_path, release, ALL_RELATIONS)
    assert main(["verify-release", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "ok merged = merge(base, adapter)" in out and "6 of 6 relation(s) hold" in out
    assert main(["verify-release", str(manifest), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and len(data["relations"]) == 6


# --- every planted fault is caught, named, and sized ------------------------------------------

def _other_base(release, root: Path) -> Path:
    out = root / "llava-other"
    build(build_spec("tiny-quant", checkpoint={"format": "safetensors", "seed": 1}), out)
    return out


def _merged_twice(release, root: Path) -> Path:
    from harness.ops.merge import merge_lora

    merge_lora(release["adapter"], release["merged"], root / "llava-twice")
    return root / "llava-twice"


def _alpha_not_over_r(release, root: Path) -> Path:
    """The update scaled by alpha instead of alpha / r: an adapter config with r times the
    alpha gives exactly that scaling."""
    from harness.ops.merge import merge_lora

    adapter = shutil.copytree(release["adapter"], root / "llava-lora-alpha")
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["lora_alpha"] = config["lora_alpha"] * config["r"]
    path.write_text(json.dumps(config))
    merge_lora(adapter, release["base"], root / "llava-alpha")
    return root / "llava-alpha"


def _edit_safetensors(folder: Path, edit) -> Path:
    for shard in sorted(folder.glob("*.safetensors")):
        state = load_file(shard)
        edit(state)
        save_file(state, shard, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: s.name for s in sorted(folder.glob("*.safetensors"))
                              for k in load_file(s)}
        index.write_text(json.dumps(data))
    return folder


def _dropped_vision_layer(release, root: Path) -> Path:
    hf = shutil.copytree(release["hf"], root / "llava-hf-dropped")

    def drop(state):
        for key in [k for k in state if ".encoder.layers.1." in k]:
            del state[key]
    return _edit_safetensors(hf, drop)


def _swapped_keys(release, root: Path) -> Path:
    hf = shutil.copytree(release["hf"], root / "llava-hf-swapped")

    def swap(state):
        q = next(k for k in state if k.endswith("layers.0.self_attn.q_proj.weight"))
        k = q.replace("q_proj", "k_proj")
        state[q], state[k] = state[k], state[q]
    return _edit_safetensors(hf, swap)


def _projector_left(release, root: Path) -> Path:
    llama = shutil.copytree(release["llama"], root / "vicuna-leftover")
    projector = torch.load(release["projector"], weights_only=True)
    return _edit_safetensors(llama, lambda state: state.update(
        {"model.mm_projector.0.weight": projector["model.mm_projector.0.weight"]}))


def _nf4_layers_swapped(release, root: Path) -> Path:
    nf4 = shutil.copytree(release["nf4"], root / "llava-nf4-swapped")

    def swap(state):
        a, b = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
        for key in [k for k in state if k.startswith(a)]:
            other = b + key[len(a):]
            state[key], state[other] = state[other], state[key]
    return _edit_safetensors(nf4, swap)


def _nf4_config(release, root: Path, edit) -> Path:
    nf4 = shutil.copytree(release["nf4"], root / "llava-nf4-edited")
    config = json.loads((nf4 / "config.json").read_text())
    edit(config)
    (nf4 / "config.json").write_text(json.dumps(config))
    return nf4


def _nf4_rope_changed(release, root: Path) -> Path:
    """transformers 5 saves rope as rope_parameters; the merged folder says rope_theta."""
    def edit(config):
        config["rope_parameters"]["rope_theta"] = 500000.0
    return _nf4_config(release, root, edit)


def _nf4_other_tower(release, root: Path) -> Path:
    """Weights and config fields all right, but the tower named is not the one the model was
    made with (a copy whose patch embedding is negated: drift 0.63 of the largest |logit|
    here, twice the bound; another random tower moves it only 0.35-0.49): only running the
    model shows it."""
    named = Path(json.loads((release["nf4"] / "config.json").read_text())["mm_vision_tower"])
    tower = shutil.copytree(named, root / "other-tower")
    weights = next(tower.glob("*.safetensors"))
    state = load_file(weights)
    key = next(k for k in state if k.endswith("patch_embedding.weight"))
    state[key] = -state[key]
    save_file(state, weights, metadata={"format": "pt"})

    def edit(config):
        config["mm_vision_tower"] = str(tower)
    return _nf4_config(release, root, edit)


def _projector_edited(release, root: Path) -> Path:
    state = torch.load(release["projector"], weights_only=True)
    state["model.mm_projector.2.bias"] = state["model.mm_projector.2.bias"] + 1e-3
    out = root / "bad" / "mm_projector.bin"
    out.parent.mkdir()
    torch.save(state, out)
    return out


FAULTS = [
    # (id, the artifact swapped in, how it is made, the relation, what the fault says)
    ("wrong-base", "base", _other_base, "merged",
     "not the base plus a multiple of the update: merged into another base?"),
    ("merged-twice", "merged", _merged_twice, "merged",
     "the update is applied twice: merged twice?"),
    ("alpha-not-over-r", "merged", _alpha_not_over_r, "merged",
     "the update is r=4 times peft's: scaled by alpha instead of alpha/r?"),
    ("dropped-vision-layer", "hf", _dropped_vision_layer, "hf",
     "model.vision_tower.vision_tower.vision_model.encoder.layers.1."),
    ("mis-mapped-key", "hf", _swapped_keys, "hf",
     "holds model.layers.0.self_attn.q_proj.weight, not merged's "
     "model.layers.0.self_attn.k_proj.weight: a key mapped to the wrong name"),
    ("projector-left-in-strip", "llama", _projector_left, "llama",
     "keeps model.mm_projector.0.weight"),
    ("quantized-layers-swapped", "nf4", _nf4_layers_swapped, "nf4",
     "model.layers.0.mlp.up_proj.weight: dequantized max |difference|"),
    ("quantized-rope-changed", "nf4", _nf4_rope_changed, "nf4",
     "config quantized.rope_theta: 500000.0, the source says 10000.0"),
    ("quantized-with-another-tower", "nf4", _nf4_other_tower, "nf4",
     "logit probe: nf4 drifts"),
    ("projector-not-a-copy", "projector", _projector_edited, "projector",
     "model.mm_projector.2.bias: not a copy of merged's model.mm_projector.2.bias: max "
     "|difference| 0.001"),
]


@pytest.mark.parametrize("case", FAULTS, ids=[f[0] for f in FAULTS])
def test_each_planted_fault_is_caught_and_sized(release, tmp_path, case):
    _, artifact, make, relation, says = case
    artifacts = {**release, artifact: make(release, tmp_path)}
    got = verdicts(write_manifest(tmp_path, artifacts, ALL_RELATIONS))
    ok, faults, _notes = got.pop(relation)
    assert not ok and any(says in f for f in faults), faults
    if artifact not in ("base", "merged"):  # a leaf: every other relation still holds
        assert {target: v[0] for target, v in got.items()} == dict.fromkeys(got, True), got


def _without_tokenizer(release, root: Path, monkeypatch) -> Path:
    nf4 = shutil.copytree(release["nf4"], root / "llava-nf4-bare")
    for name in ("tokenizer.model", "tokenizer.json"):
        (nf4 / name).unlink(missing_ok=True)
    return nf4


def _too_big_to_run(release, root: Path, monkeypatch) -> Path:
    monkeypatch.setattr("harness.release.drift.PROBE_LIMIT", 1024)
    return release["nf4"]


@pytest.mark.parametrize("make, says", [
    (_without_tokenizer, "logit probe skipped: nf4 has no tokenizer"),
    (_too_big_to_run, "MiB together; the probe runs under 0 MiB"),
], ids=["no-tokenizer", "too-big"])
def test_the_logit_probe_says_why_it_did_not_run(release, tmp_path, monkeypatch, make, says):
    artifacts = {**release, "nf4": make(release, tmp_path, monkeypatch)}
    ok, faults, notes = verdicts(write_manifest(tmp_path, artifacts, ALL_RELATIONS))["nf4"]
    assert ok and any(says in n for n in notes), notes


def test_a_size_is_given_for_every_tensor_difference(release, tmp_path):
    artifacts = {**release, "merged": _merged_twice(release, tmp_path)}
    _, faults, _ = verdicts(write_manifest(tmp_path, artifacts, ALL_RELATIONS))["merged"]
    assert faults and all("max |difference|" in f and "ulps at scale" in f for f in faults)


def test_an_artifact_of_the_wrong_kind_is_named(release, tmp_path):
    artifacts = {**release, "llama": release["hf"]}
    ok, faults, _ = verdicts(write_manifest(tmp_path, artifacts, ALL_RELATIONS))["llama"]
    assert not ok and faults == ["llama is a llava-hf folder; strip makes language_model"]


# --- the manifest is untrusted input ----------------------------------------------------------

@pytest.mark.parametrize("text, says", [
    ('[artifacts]\nbase = "nowhere"\n[made]\nx = "strip(base)"', "does not exist"),
    ('[artifacts]\nbase = "."\n[made]\nbase = "bake(base)"', "expected one of merge(...)"),
    ('[artifacts]\nbase = "."\n[made]\nx = "strip(base)"', "'x' is not in [artifacts]"),
    ('[artifacts]\nbase = "."\nq = "."\n[made]\nq = "quantize(base, nf3)"', "scheme 'nf3'"),
    ('[artifacts]\nbase = "."\n[made]\nbase = "strip(base)"', "made from itself"),
    ('[artifacts\n', "not TOML"),
    ('[artifacts]\nbase = "."\n[made]\nx = "strip(base)"\n[extra]\n', "'x' is not in"),
], ids=["missing-path", "unknown-op", "unknown-name", "bad-scheme", "itself", "toml",
        "unknown-table"])
def test_a_bad_manifest_is_one_line_and_exit_2(tmp_path, capsys, text, says):
    path = tmp_path / "release.toml"
    path.write_text(text)
    with pytest.raises(ManifestError, match=says.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        read_manifest(path)
    assert main(["verify-release", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err and "internal error" not in err


def test_bench_verify_release_records_it_against_one_read(release, tmp_path):
    """`bench verify-release`: the command and a read of every artifact, in child processes,
    the ratio recorded with its goal (the real-size figures are in docs/release.md)."""
    from harness.bench.check import bench_reads, verify_release_bench
    from harness.report.results import load_results

    manifest = write_manifest(tmp_path, {k: release[k] for k in ("base", "adapter", "merged")},
                              {"merged": ALL_RELATIONS["merged"]})
    out = tmp_path / "bench.json"
    assert bench_reads([(verify_release_bench(manifest), "tiny")], 1, out) == 0
    (record,) = load_results(out).records
    assert record.suite == "bench-verify-release"
    assert {"verify_release_wall_s", "read_wall_s", "verify_release_over_read",
            "verify_release_peak_anon"} <= set(record.metrics)


def test_bench_merge_copy_records_the_merge_against_a_copy(release, tmp_path):
    """`bench merge-copy`: merge-lora against `cp -r` of its base + sync, in child processes,
    the ratio recorded with its goal, and neither output left behind (the real-size figures
    are in docs/lora-merge.md)."""
    from harness.bench.check import bench_reads, merge_bench
    from harness.report.results import load_results

    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "bench.json"
    assert bench_reads([(merge_bench(release["adapter"], release["base"], work), "tiny")], 2,
                       out) == 0
    (record,) = load_results(out).records
    assert record.suite == "bench-merge-copy"
    assert len(record.metrics["merge_copy_wall_s"].sample.values) == 2
    assert {"read_wall_s", "merge_copy_over_read", "merge_copy_peak_anon"} <= set(record.metrics)
    assert list(work.iterdir()) == []
