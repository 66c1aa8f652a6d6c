"""The contract (harness/llava/) and `llava-harness check`: every rule is tripped by a crafted
folder reproducing the defect users reported, with a message that names the cause, and every
kind of folder has a clean control that passes with nothing to say.

Controls: a tiny LLaVA-1.5 (safetensors and .bin), a LLaVA-1.6 (anyres, stored tower,
image_newline), both converted to llava-hf, the stripped plain model, a LLaVA LoRA adapter and a
plain one, a stage-1 projector folder and a pre-quantized (nf4, double quant) folder. Each case
copies one control, plants one defect, and checks the folder: the rule fires, its message says
what is wrong, and no unrelated error fires beside it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.cli.app import main
from harness.data import fixtures_dir
from harness.llava.check import RULES, check
from harness.synth.builder import build
from harness.synth.presets import build_spec

SEVERE = "error"


# --- the controls ------------------------------------------------------------------------------

def _lora(base: Path, out: Path) -> Path:
    from harness.ops.load import load
    from harness.ops.lora import LoraSpec, apply_lora, randomize_adapter, save_llava_lora

    loaded = load(base, device="cpu", dtype="float32")
    peft_model = apply_lora(loaded.model, LoraSpec(r=4, alpha=8))
    randomize_adapter(peft_model, 0)
    return save_llava_lora(peft_model, out)


def _plain_lora(plain: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(plain)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(0))
    peft_model.save_pretrained(out)
    return out


def _stage1(llava: Path, out: Path) -> Path:
    from harness.ops.extract import extract

    extract(llava, out / "mm_projector.bin")
    config = json.loads((llava / "config.json").read_text())
    config["tune_mm_mlp_adapter"] = True
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def controls(tmp_path_factory) -> dict[str, Path]:
    from harness.ops.convert import convert
    from harness.ops.strip import strip

    root = tmp_path_factory.mktemp("controls")
    out = {"llava": root / "llava-tiny", "llava-bin": root / "llava-tiny-bin",
           "next": root / "llava-tiny-next", "quantized": root / "llava-tiny-nf4"}
    build(build_spec("tiny", checkpoint={"format": "safetensors"}), out["llava"])
    build(build_spec("tiny"), out["llava-bin"])
    build(build_spec("tiny-next"), out["next"])
    build(build_spec("tiny-quant", checkpoint={"quantization": "nf4-dq"}), out["quantized"])
    for name, source in (("hf", "llava"), ("hf-next", "next")):
        out[name] = root / f"llava-{name}"
        convert(out[source], out[name], "hf")
    out["plain"] = root / "vicuna-tiny"
    strip(out["llava"], out["plain"])
    out["lora"] = _lora(out["llava"], root / "llava-tiny-lora")
    out["plain-lora"] = _plain_lora(out["plain"], root / "vicuna-tiny-lora")
    out["projector"] = _stage1(out["llava"], root / "llava-tiny-pretrain")
    return out


BASES = {"lora": "llava", "plain-lora": "plain"}


@pytest.mark.parametrize("control", ["llava", "llava-bin", "next", "hf", "hf-next", "plain",
                                     "lora", "plain-lora", "projector", "quantized"])
def test_every_clean_control_checks_clean(controls, control):
    base = controls[BASES[control]] if control in BASES else None
    report = check(controls[control], base)
    assert [f.line() for f in report.findings] == []
    assert report.exit_code == 0
    looked = [c for c, r in report.results.items() if not r.skipped]
    assert len(looked) >= 8, f"only {looked} looked at a {report.kind} folder"


def test_the_published_7b_config_checks_clean(tmp_path):
    """liuhaotian/llava-v1.5-7b's config.json (fixtures/reference) is metadata only: the rules
    about the files it does not hold (weights, tokenizer) are left out, the rules that need
    the weights skip, and the rest find nothing but the hub tower they cannot read."""
    published = json.loads((fixtures_dir() / "reference" / "llava-v1.5-7b.json").read_text())
    folder = tmp_path / "llava-v1.5-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(published["config"]))
    report = check(folder, ignore=("weights-missing", "tokenizer-missing"))
    assert [f.code for f in report.findings] == ["tower-not-local"]
    looked = {c for c, r in report.results.items() if not r.skipped and not r.ignored}
    assert {"config-field", "config-incomplete", "model-type-mismatch",
            "tower-unresolvable", "aspect-ratio-unknown"} <= looked


# --- crafting defects ---------------------------------------------------------------------------

def edit_json(path: Path, drop=(), **fields) -> None:
    data = json.loads(path.read_text())
    data.update(fields)
    for name in drop:
        data.pop(name, None)
    path.write_text(json.dumps(data, indent=2))


def _reindex(folder: Path) -> None:
    """The safetensors index rewritten from the shards (so only the planted defect differs)."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return
    weight_map, total = {}, 0
    for shard in sorted(folder.glob("*.safetensors")):
        for key, tensor in load_file(shard).items():
            weight_map[key] = shard.name
            total += tensor.numel() * tensor.element_size()
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def edit_tensors(folder: Path, edit) -> None:
    """`edit(state)` on every safetensors shard's tensors, in place; the index follows."""
    for shard in sorted(folder.glob("*.safetensors")):
        state = load_file(shard)
        edit(state)
        save_file(state, shard, metadata={"format": "pt"})
    _reindex(folder)


def set_tensor(key: str, make):
    def edit(state):
        if key in state:
            state[key] = make(state[key])
    return edit


def drop_tensors(*prefixes):
    def edit(state):
        for key in [k for k in state if k.startswith(prefixes)]:
            del state[key]
    return edit


def add_tensor(key: str, value: torch.Tensor, shard_of: str = "lm_head.weight"):
    def edit(state):
        if shard_of in state:
            state[key] = value
    return edit


def bump_norms(scale: float):
    def edit(state):
        for key in state:
            if key.endswith("layernorm.weight") or key == "model.norm.weight":
                state[key] = state[key] * 0 + scale
    return edit


def edit_adapter(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def edit_trainables(folder: Path, rename) -> None:
    path = folder / "non_lora_trainables.bin"
    state = torch.load(path, weights_only=True)
    torch.save({rename(k): v for k, v in state.items()}, path)


P0W = "model.mm_projector.0.weight"
NEWLINE = "model.image_newline"
PATCH = "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"
CLASS = "model.vision_tower.vision_tower.vision_model.embeddings.class_embedding"


@dataclass(frozen=True)
class Case:
    code: str
    control: str
    plant: object  # (folder: Path) -> None
    says: str      # in the finding's message or place
    also: tuple[str, ...] = ()  # other rules the same defect rightly trips
    base: str | None = None
    name: str = ""

    @property
    def id(self) -> str:
        return self.name or self.code


def config_of(**fields):
    return lambda f: edit_json(f / "config.json", **fields)


def unlink(*names):
    def plant(folder: Path):
        for name in names:
            (folder / name).unlink()
    return plant


def tensors(edit):
    return lambda f: edit_tensors(f, edit)


def _truncate(folder: Path) -> None:
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])


def _rename_folder(folder: Path) -> None:
    (folder / "NAME").write_text("my-model")  # the case's folder is renamed by the test


def _original_config_over_hf(folder: Path) -> None:
    """An original-layout config.json over llava-hf tensors (a conversion that wrote half)."""
    hf = json.loads((folder / "config.json").read_text())
    text = {k: v for k, v in hf["text_config"].items() if k != "model_type"}
    (folder / "config.json").write_text(json.dumps({
        **text, "model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"],
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 32,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2}))


def _tower_config(**fields):
    def plant(folder: Path):
        tower = Path(json.loads((folder / "config.json").read_text())["mm_vision_tower"])
        local = folder / "tower"
        shutil.copytree(tower, local)
        edit_json(local / "config.json", **fields)
        edit_json(folder / "config.json", mm_vision_tower=str(local))
    return plant


def _tokenizer_file(name: str, **fields):
    return lambda f: edit_json(f / name, **fields)


def _corrupt_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    (folder / "tokenizer.json").unlink()


def _more_tokens(folder: Path) -> None:
    """Two added tokens past the 512 embedding rows, as tokenizer_config.json records them."""
    path = folder / "tokenizer_config.json"
    data = json.loads(path.read_text())
    for i, token in ((512, "<image>"), (513, "<pad>")):
        data["added_tokens_decoder"][str(i)] = {"content": token, "lstrip": False,
                                                "normalized": False, "rstrip": False,
                                                "single_word": False, "special": True}
    path.write_text(json.dumps(data))


def _zero_b(state):
    for key in state:
        if "lora_B" in key:
            state[key] = torch.zeros_like(state[key])


def _drop_one_b(state):
    del state[next(k for k in sorted(state) if "lora_B" in k)]


def _empty_adapter(state):
    for key in list(state):
        state[key] = torch.zeros(0)


def _empty_bin_adapter(folder: Path) -> None:
    """The 443-byte adapter_model.bin a ZeRO-3 run saves: an empty state dict."""
    (folder / "adapter_model.safetensors").unlink()
    torch.save({}, folder / "adapter_model.bin")


def _projector_lora(state):
    prefix = "base_model.model.model.mm_projector.0"
    state[f"{prefix}.lora_A.weight"] = torch.randn(4, 32)
    state[f"{prefix}.lora_B.weight"] = torch.randn(64, 4)


def _stage1_keys(folder: Path) -> None:
    state = torch.load(folder / "mm_projector.bin", weights_only=True)
    torch.save({k.replace("mm_projector", "proj"): v for k, v in state.items()},
               folder / "mm_projector.bin")


CASES = [
    # config.json
    Case("config-missing", "llava", unlink("config.json"), "missing",
         also=("weights-unreadable",)),
    Case("config-field", "llava", config_of(hidden_size=-64), "hidden_size is -64"),
    Case("config-field", "llava", config_of(architectures="LlavaLlamaForCausalLM"),
         "architectures is 'LlavaLlamaForCausalLM', expected a list of strings",
         name="config-field-architectures"),
    Case("config-field", "llava", config_of(num_key_value_heads=3),
         "num_attention_heads 4 is not a multiple of num_key_value_heads 3",
         name="config-field-geometry"),
    Case("config-field", "next", config_of(image_grid_pinpoints=None),
         "'anyres' needs image_grid_pinpoints", name="config-field-anyres"),
    Case("config-incomplete", "llava", lambda f: edit_json(f / "config.json",
                                                          drop=("mm_hidden_size",)),
         "mm_hidden_size"),
    Case("config-tensors-disagree", "llava", config_of(vocab_size=515),
         "says model.embed_tokens.weight is [515, 64], but"),
    Case("model-type-mismatch", "llava", config_of(model_type="llava_mistral"),
         "name different backbones"),
    # the weights
    Case("weights-unreadable", "llava", _truncate, "truncated"),
    Case("weights-missing", "llava", lambda f: [p.unlink() for p in f.glob("model*")],
         "no pytorch_model"),
    Case("layout-mismatch", "hf", _original_config_over_hf, "named in the llava-hf layout",
         also=("unknown-tensors",)),
    Case("unknown-tensors", "llava", tensors(add_tensor("model.extra.weight", torch.ones(2))),
         "model.extra.weight"),
    Case("lm-head-missing", "llava", tensors(drop_tensors("lm_head.")), "lm_head.weight",
         also=("config-tensors-disagree",)),
    Case("values-nonfinite", "llava",
         tensors(set_tensor(P0W, lambda t: t.index_fill(1, torch.tensor([3]), float("nan")))),
         P0W),
    Case("values-empty", "llava", tensors(set_tensor("model.mm_projector.2.bias",
                                                     lambda t: torch.zeros(0))),
         "model.mm_projector.2.bias", also=("projector-type-mismatch", "projector-dims")),
    Case("values-all-zero", "llava", tensors(set_tensor(P0W, torch.zeros_like)), P0W),
    Case("values-fp16-overflow", "llava",
         tensors(set_tensor(P0W, lambda t: t.index_fill(0, torch.tensor([0]), 1e6))), "1e+06"),
    Case("delta-weights", "llava", tensors(bump_norms(0.001)), "below 0.05"),
    # the projector
    Case("projector-missing", "llava", tensors(drop_tensors("model.mm_projector.")),
         "no projector tensor"),
    Case("projector-type-mismatch", "llava", config_of(mm_projector_type="linear"),
         "an 'mlp2x_gelu' projector"),
    Case("projector-dims", "llava", tensors(set_tensor(P0W, lambda t: t[:, :16].clone())),
         "maps 16 -> 64", also=("projector-type-mismatch",)),
    Case("folder-name-routing", "llava", _rename_folder, "means 'language_model'"),
    # the vision side
    Case("tower-unresolvable", "llava", config_of(mm_vision_tower="someone/siglip-tower"),
         "no tower LLaVA's builder knows"),
    Case("tower-not-local", "llava", config_of(mm_vision_tower="openai/clip-vit-large-patch14"),
         "a hub id"),
    Case("tower-config", "llava", _tower_config(hidden_size="wide"), "hidden_size is 'wide'"),
    Case("tower-kind", "llava", _tower_config(model_type="siglip_vision_model"),
         "'siglip_vision_model' is not a CLIP tower"),
    Case("tower-dims", "llava", config_of(mm_vision_select_layer=-9), "has 2 layers"),
    Case("stored-tower-mismatch", "next",
         tensors(set_tensor(PATCH, lambda t: t[:, :, :7, :7].clone())), "patch 7",
         also=("stored-tower-ignored",)),
    Case("stored-tower-mismatch", "next", tensors(drop_tensors(CLASS)),
         "not a CLIP tower's embeddings", name="stored-tower-not-clip"),
    Case("stored-tower-ignored", "next", config_of(unfreeze_mm_vision_tower=False),
         "stores a vision tower"),
    Case("stored-tower-absent", "llava", config_of(unfreeze_mm_vision_tower=True),
         "no tower is stored"),
    Case("anyres-pinpoints-grid", "next", config_of(image_grid_pinpoints=[[28, 50]]),
         "[28, 50] is not a multiple of the tower's 28 px crops"),
    Case("image-newline-missing", "next", tensors(drop_tensors(NEWLINE)), "missing"),
    Case("image-newline-shape", "next", tensors(set_tensor(NEWLINE, lambda t: t[:63].clone())),
         "shape [63], expected [64]"),
    Case("image-newline-unused", "next", config_of(mm_patch_merge_type="flat"),
         "mm_patch_merge_type is 'flat'"),
    Case("aspect-ratio-unknown", "llava", config_of(image_aspect_ratio="letterbox"),
         "'letterbox'"),
    Case("context-truncation", "next", config_of(tokenizer_model_max_length=8),
         "one image alone can be"),
    # the tokenizer and generation config
    Case("tokenizer-missing", "llava", unlink("tokenizer.model", "tokenizer.json"),
         "no tokenizer"),
    Case("tokenizer-class-stale", "llava",
         _tokenizer_file("tokenizer_config.json", tokenizer_class="LLaMATokenizer"),
         "'LLaMATokenizer' is no tokenizer class", also=("tokenizer-unloadable",)),
    Case("tokenizer-unloadable", "llava", _corrupt_tokenizer, "AutoTokenizer refuses it"),
    Case("tokenizer-beyond-embeddings", "llava", _more_tokens, "512 rows, the tokenizer has 514 ids",
         also=("added-token-out-of-range",)),
    Case("added-token-out-of-range", "llava",
         lambda f: (f / "added_tokens.json").write_text('{"<image>": 600}'), "id 600"),
    Case("special-token-out-of-range", "llava",
         _tokenizer_file("generation_config.json", pad_token_id=32000), "32000"),
    Case("generation-config-invalid", "llava",
         _tokenizer_file("generation_config.json", do_sample=False, temperature=0.2),
         "temperature"),
    Case("im-tokens-missing", "llava", config_of(mm_use_im_start_end=True), "<im_start>"),
    # adapters
    Case("adapter-config", "lora", _tokenizer_file("adapter_config.json", r="eight"),
         "r is 'eight'", base="llava", also=("adapter-rank-mismatch",)),
    Case("adapter-unreadable", "lora",
         lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00" * 16), "JSON",
         base="llava"),
    Case("adapter-empty", "lora", lambda f: edit_adapter(f, _empty_adapter), "empty tensors",
         base="llava", also=("adapter-base-mismatch", "adapter-rank-mismatch", "values-empty")),
    Case("adapter-empty", "lora", _empty_bin_adapter, "no LoRA tensor (0 tensor(s) in all)",
         base="llava", name="adapter-empty-bin"),
    Case("adapter-missing-half", "lora", lambda f: edit_adapter(f, _drop_one_b),
         "lora_B of", base="llava"),
    Case("adapter-rank-mismatch", "lora", _tokenizer_file("adapter_config.json", r=5),
         "rank 4 (B: 4), adapter_config.json says 5", base="llava"),
    Case("adapter-zero-update", "lora", lambda f: edit_adapter(f, _zero_b), "are zero",
         base="llava"),
    Case("adapter-targets-multimodal", "lora", lambda f: edit_adapter(f, _projector_lora),
         "model.mm_projector.0.weight", base="llava"),
    Case("adapter-base-mismatch", "lora", lambda f: None, "the base's is", base="other-base",
         also=("adapter-config-base-mismatch",)),
    Case("adapter-config-base-mismatch", "lora", config_of(vocab_size=515),
         "[515, 64], but", base="llava"),
    Case("trainables-dropped", "lora",
         lambda f: edit_trainables(f, lambda k: k[k.index("mm_projector"):]),
         "after LLaVA's prefix stripping", base="llava"),
    Case("trainables-missing", "lora", unlink("non_lora_trainables.bin"), "missing",
         base="llava"),
    Case("projector-file-keys", "projector", _stage1_keys, "none of them a projector's",
         also=("projector-type-mismatch",)),
    Case("stage1-im-start-end", "projector", config_of(mm_use_im_start_end=True),
         "model.embed_tokens.weight"),
    # plain (stripped) folders
    Case("plain-leftovers", "plain", tensors(add_tensor(P0W, torch.ones(64, 32))), P0W,
         also=("unknown-tensors",)),
    Case("plain-llava-fields", "plain", config_of(mm_projector_type="mlp2x_gelu",
                                                   image_aspect_ratio="pad"), "mm_projector_type"),
]


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    """A base of other dims than the adapter's (tiny-quant's 192-wide MLP)."""
    out = tmp_path_factory.mktemp("other") / "llava-other"
    build(build_spec("tiny-quant"), out)
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_each_defect_is_caught_and_named(case, controls, other_base, tmp_path):
    # Names LLaVA's own loader routes as the control's kind (it goes by the name).
    prefix = {"lora": "llava-lora", "plain": "vicuna", "plain-lora": "vicuna-lora",
              "projector": "llava-pretrain"}.get(case.control, "llava")
    folder = tmp_path / "cases" / f"{prefix}-{case.id}"
    shutil.copytree(controls[case.control], folder)
    case.plant(folder)
    if (folder / "NAME").is_file():
        folder = folder.rename(folder.parent / (folder / "NAME").read_text())
        (folder / "NAME").unlink()
    base = other_base if case.base == "other-base" else controls.get(case.base)
    report = check(folder, base)
    mine = [f for f in report.findings if f.code == case.code]
    assert mine, f"{case.code} did not fire; found: {[f.line() for f in report.findings]}"
    assert any(case.says in f.message or case.says in f.where for f in mine), \
        [f.line() for f in mine]
    errors = {f.code for f in report.findings if f.severity == SEVERE}
    assert errors <= {case.code, *case.also}, [f.line() for f in report.findings
                                              if f.code not in (case.code, *case.also)]
    assert report.exit_code == (1 if errors else 0)


def test_every_rule_has_a_crafted_case():
    assert {c.code for c in CASES} == set(RULES)


def test_every_rule_says_what_loaders_do_and_the_fix_and_where_it_was_reported():
    for code, rule in RULES.items():
        assert rule.loader and rule.fix and rule.title and rule.report, code
        assert code == code.lower() and " " not in code


# --- the command --------------------------------------------------------------------------------

def test_check_exit_codes_json_and_ignore(controls, tmp_path, capsys):
    assert main(["check", str(controls["llava"])]) == 0
    assert "0 error(s), 0 warning(s)" in capsys.readouterr().out
    bad = shutil.copytree(controls["llava"], tmp_path / "llava-bad")
    edit_json(bad / "config.json", mm_projector_type="linear", image_aspect_ratio="letterbox")
    assert main(["check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("error projector-type-mismatch ") and "fix: set mm_projector_type" \
        in out and "warning aspect-ratio-unknown" in out
    assert main(["check", str(bad), "--ignore", "projector-type-mismatch", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["exit"] == 0 and data["ignored"] == ["projector-type-mismatch"]
    assert [f["code"] for f in data["findings"]] == ["aspect-ratio-unknown"]
    assert data["findings"][0]["report"] == RULES["aspect-ratio-unknown"].report


@pytest.mark.parametrize("args, says", [
    (["{missing}"], "not a folder"),
    (["{empty}"], "not a model folder"),
    (["{llava}", "--ignore", "no-such-check"], "--ignore no-such-check: no such check"),
    (["{lora}", "--base", "{lora}"], "--base must be a full LLaVA or language model folder"),
], ids=["missing", "empty", "unknown-ignore", "adapter-as-base"])
def test_unreadable_input_is_one_line_and_exit_2(controls, tmp_path, capsys, args, says):
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "nowhere", "empty": tmp_path / "empty", **controls}
    assert main(["check", *[a.format(**paths) for a in args]]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err and "internal error" not in err


def test_docs_list_every_check_as_the_registry_has_it():
    docs = Path(__file__).resolve().parent.parent / "docs" / "checks.md"
    if not docs.is_file():
        pytest.skip("an installed harness: the documentation stays in the checkout")
    from harness.llava.check import catalog

    table = docs.read_text().split("## Every check\n\n", 1)[1]
    assert table == catalog(), "docs/checks.md is stale: regenerate its table with " \
                               "`llava-harness check --list`"


def test_bench_check_records_the_check_against_one_read(controls, tmp_path):
    """`bench check` on a folder: both steps measured in child processes, the ratio recorded
    with its goal (the real-size figures are in docs/checks.md)."""
    from harness.bench.check import bench_reads, check_bench
    from harness.report.results import load_results

    out = tmp_path / "check.json"
    assert bench_reads([(check_bench(controls["llava"]), "tiny")], 1, out) == 0
    (record,) = load_results(out).records
    assert record.suite == "bench-check" and record.outcome in ("passed", "failed")
    assert {"check_wall_s", "read_wall_s", "check_over_read", "check_peak_anon"} <= \
        set(record.metrics)
    assert record.metrics["check_over_read"].value > 0


def test_bench_check_measures_check_against_one_read(bench_json):
    """`bench check` on the tiny preset: `llava-harness check` and one read of the same bytes,
    each measured in a child; the ratio is that of the walls it recorded (no suite ran the
    command before)."""
    case, value, _ = bench_json("check", "--preset", "tiny", "--format", "safetensors",
                                "--repeat", "1")
    assert case == "tiny-safetensors"
    assert value["check_over_read"] == pytest.approx(value["check_wall_s"] / value["read_wall_s"])
    assert value["bytes"] > 0 and value["check_peak_rss"] > 0
