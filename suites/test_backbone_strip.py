"""Backbone stripping: a LLaVA checkpoint (original or llava-hf layout) -> a plain Llama/Mistral
folder, checked strictly: the key set equals the target class's state dict on the meta device
exactly, shapes and dtypes match, every tensor's bytes are the source's, text logits equal the
LLaVA model's language path bit for bit (float32 and float16), inputs are never written, and
shards with nothing to drop are hard-linked. Every check is also shown to fail on a planted
defect."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from harness.checkpoint import torch_zip
from harness.checkpoint.atomic import OutputExistsError
from harness.checkpoint.reader import CheckpointError
from harness.cli.app import main
from harness.llava import keys
from harness.llava.keys import KeyMapError
from harness.ops.strip import StripError, parameter_count, scan_folder, strict_problems, strip
from harness.synth.builder import build
from harness.synth.presets import build_spec

IDS = torch.tensor([[1, 17, 42, 7, 300, 5, 511, 2]])
MISTRAL = {"arch": "mistral", "num_key_value_heads": 2, "rope_theta": 1e6}
LLAVA_7B_LM_PARAMS = 6_738_415_616
MULTIMODAL = ("mm_projector", "vision_tower", "vision_resampler", "image_newline",
              "multi_modal_projector")


# --- helpers -----------------------------------------------------------------------------


def bare_build(folder: Path, model: dict | None = None, tower: bool = False,
               **checkpoint) -> Path:
    """A tiny original-layout checkpoint without tokenizer (builds in milliseconds); its CLIP
    tower folder only when asked (layout conversion needs it)."""
    spec = dataclasses.replace(build_spec("tiny", model=model, checkpoint=checkpoint or None),
                               with_tokenizer=False, with_vision_tower=tower)
    build(spec, folder)
    return folder


def hf_build(folder: Path, arch: str = "llama", fmt: str = "safetensors",
             max_shard_size: str = "60KB") -> Path:
    """A tiny llava-hf checkpoint saved by transformers 5 itself (flattened tower layout);
    `bin` re-saves each shard with torch.save under the same keys."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        MistralConfig,
    )

    torch.manual_seed(0)
    lm = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
          "num_attention_heads": 4, "vocab_size": 512}
    text = MistralConfig(**lm, num_key_value_heads=2) if arch == "mistral" else LlamaConfig(**lm)
    vision = CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, image_size=28, patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=511,
                         image_seq_length=4)
    LlavaForConditionalGeneration(config).save_pretrained(folder, max_shard_size=max_shard_size)
    if fmt == "bin":
        _resave_as_bin(folder)
    return folder


def _resave_as_bin(folder: Path) -> None:
    from safetensors.torch import load_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    names = sorted(set(index["weight_map"].values()))
    renamed = {n: n.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
               for n in names}
    for name in names:
        torch.save(load_file(folder / name), folder / renamed[name])
        (folder / name).unlink()
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors.index.json").unlink()


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tensor_bytes(folder: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """key -> (dtype, shape, bytes), read through the pieces the scanner locates."""
    out = {}
    for key, source in scan_folder(folder).tensors.items():
        data = b""
        for piece in source.byte_pieces(folder):
            with open(piece.path, "rb") as fh:
                fh.seek(piece.offset)
                data += fh.read(piece.nbytes)
        out[key] = (source.dtype, source.shape, data)
    return out


def expected_plain(source: dict, layout: str, keep: bool) -> dict:
    """What the stripped folder must hold, by plain string rules independent of keys.py."""
    out = {}
    for key, value in source.items():
        if any(m in key for m in MULTIMODAL) or (key.endswith("rotary_emb.inv_freq")
                                                and not keep):
            continue
        if layout == "hf":
            if key.startswith(("language_model.lm_head.", "language_model.model.")):
                key = key.removeprefix("language_model.")
            elif key.startswith("model.language_model."):
                key = "model." + key.removeprefix("model.language_model.")
        out[key] = value
    return out


def rewrite_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


# --- the key maps themselves ---------------------------------------------------------------


@pytest.mark.parametrize("layout, key, canonical", [
    (keys.ORIGINAL, "model.layers.31.mlp.down_proj.weight", "model.layers.31.mlp.down_proj.weight"),
    (keys.HF_READ, "language_model.model.layers.7.self_attn.o_proj.weight",
     "model.layers.7.self_attn.o_proj.weight"),
    (keys.HF_READ, "model.language_model.norm.weight", "model.norm.weight"),
    (keys.HF_READ, "language_model.lm_head.weight", "lm_head.weight"),
    (keys.HF_READ, "multi_modal_projector.linear_2.bias", "model.mm_projector.2.bias"),
    (keys.HF_READ, "vision_tower.vision_model.post_layernorm.weight",
     "model.vision_tower.vision_tower.vision_model.post_layernorm.weight"),
    (keys.HF_READ, "vision_tower.post_layernorm.weight",
     "model.vision_tower.vision_tower.vision_model.post_layernorm.weight"),
    (keys.TOWER_FOLDER, "text_model.embeddings.token_embedding.weight", None),
    (keys.PLAIN, "model.mm_projector.0.weight", None),
    (keys.PLAIN, "model.image_newline", None),
    (keys.PLAIN, "model.vision_resampler.attn.in_proj_weight", None),
    (keys.PLAIN, "model.layers.3.self_attn.rotary_emb.inv_freq",
     "model.layers.3.self_attn.rotary_emb.inv_freq"),
], ids=lambda v: v.name if isinstance(v, keys.KeyMap) else None)
def test_key_maps(layout, key, canonical):
    assert layout(key) == canonical


def test_hf_map_inverts_exactly():
    for rule in keys.HF.rules:
        probe = rule.source.replace("{}", "4").replace("*", "x.weight")
        assert keys.TO_HF(keys.HF(probe)) == probe


def test_key_map_construction_is_checked():
    with pytest.raises(ValueError, match="placeholders differ"):
        keys.KeyMap("bad", {"model.layers.{}.x": "model.x"})
    with pytest.raises(ValueError, match="may only end a template"):
        keys.KeyMap("bad", {"a.*.b": "a.*.b"})
    with pytest.raises(ValueError, match="not invertible"):
        keys.KeyMap("bad", {"a": "c", "b": "c"}).inverse("inv")
    with pytest.raises(KeyMapError, match="x.bin: model.lora_A: no rule of the plain"):
        keys.PLAIN("model.lora_A", where="x.bin")


# --- cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    layout: str = "original"
    fmt: str = "bin"
    shards: int = 2
    placement: str = "last"
    keep: bool = False
    arch: str = "llama"
    to_format: str | None = None
    legacy_in_source: bool = True

    def __str__(self) -> str:
        shape = [] if self.layout == "hf" else [f"{self.shards}shard", self.placement]
        parts = [self.layout, self.arch, self.fmt, *shape, "keep" if self.keep else "drop"]
        if self.to_format:
            parts.append(f"to-{self.to_format}")
        if not self.legacy_in_source:
            parts.append("no-legacy")
        return "-".join(parts)

    def source(self, folder: Path) -> Path:
        if self.layout == "hf":
            return hf_build(folder, self.arch, self.fmt)
        return bare_build(folder, MISTRAL if self.arch == "mistral" else None, format=self.fmt,
                          shards=self.shards, placement=self.placement,
                          legacy_buffers=self.legacy_in_source)


CASES = [
    Case(),
    Case(keep=True),
    Case(fmt="safetensors"),
    Case(fmt="safetensors", keep=True),
    Case(shards=1),
    Case(shards=1, keep=True, fmt="safetensors"),
    Case(shards=3, placement="first"),
    Case(shards=3, placement="middle", keep=True, fmt="safetensors"),
    Case(shards=3, placement="split", keep=True),
    Case(arch="mistral", fmt="safetensors", legacy_in_source=False),
    Case(arch="mistral", keep=True),
    Case(to_format="safetensors", keep=True),
    Case(fmt="safetensors", to_format="bin"),
    Case(layout="hf", fmt="safetensors"),
    Case(layout="hf", fmt="bin"),
    Case(layout="hf", arch="mistral", fmt="safetensors", to_format="bin"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_strip_is_exact_strict_and_leaves_input_alone(case: Case, tmp_path):
    src, out = case.source(tmp_path / "src"), tmp_path / "out"
    before = tree_hashes(src)
    result = strip(src, out, keep_legacy_buffers=case.keep, to_format=case.to_format)

    assert tree_hashes(src) == before
    assert strict_problems(out, allow_legacy=case.keep) == []
    assert tensor_bytes(out) == expected_plain(tensor_bytes(src), case.layout, case.keep)
    assert result.layout == case.layout and result.arch == case.arch
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == case.arch
    assert not [k for k in config if "mm_" in k or "vision" in k or k.startswith("image_")]
    fmt = case.to_format or case.fmt
    assert all(p.suffix in (".json", f".{fmt}") for p in out.iterdir())


@pytest.mark.parametrize("case", [c for c in CASES if c.layout == "original"], ids=str)
def test_shards_with_nothing_to_drop_are_linked(case: Case, tmp_path):
    src, out = case.source(tmp_path / "src"), tmp_path / "out"
    result = strip(src, out, keep_legacy_buffers=case.keep, to_format=case.to_format,
                   verify=False)
    source = scan_folder(src)
    for name, how in result.shards.items():
        held = source.files.get(name, {})
        untouched = (held and case.to_format in (None, case.fmt)
                     and not any("mm_projector" in k for k in held)
                     and (case.keep or not any(k.endswith("inv_freq") for k in held)))
        assert how == ("linked" if untouched else "rewritten"), name
        if untouched:
            assert (out / name).samefile(src / name)


# --- logits: the stripped model is the LLaVA model's language path ----------------------


@pytest.fixture(scope="module")
def stripped(tiny_checkpoint_factory, tmp_path_factory):
    """source name -> (LLaVA folder, stripped folder), built once per module."""
    root = tmp_path_factory.mktemp("stripped")
    sources = {"original-llama": tiny_checkpoint_factory(),
               "original-mistral": tiny_checkpoint_factory(model=MISTRAL,
                                                           checkpoint={"format": "safetensors"}),
               "hf-llama": hf_build(root / "hf-src"),
               # LLaVA-1.6: image_newline and the stored tuned tower go, the LM stays.
               "next-llama": tiny_checkpoint_factory("tiny-next"),
               "next-mistral": tiny_checkpoint_factory("tiny-next", model=MISTRAL,
                                                       checkpoint={"format": "bin"})}
    out = {}
    for name, src in sources.items():
        strip(src, root / name)
        out[name] = (src, root / name)
    return out


def llava_text_logits(src: Path, dtype: torch.dtype) -> torch.Tensor:
    """The LLaVA model's language path for text-only ids."""
    if "text_config" in json.loads((src / "config.json").read_text()):
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(src, dtype=dtype)
    else:
        from harness.ops.load import load_pretrained_model

        model = load_pretrained_model(src, None, "llava-tiny", device="cpu", dtype=dtype)[1]
    with torch.no_grad():
        return model.eval()(IDS).logits


def plain_logits(folder: Path, dtype: torch.dtype) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                       output_loading_info=True)
    assert {k: list(v) for k, v in info.items() if v} == {}
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("source", ["original-llama", "original-mistral", "hf-llama",
                                    "next-llama", "next-mistral"])
def test_text_logits_equal_llava_language_path_bit_for_bit(stripped, source, dtype):
    src, out = stripped[source]
    got, want = plain_logits(out, dtype), llava_text_logits(src, dtype)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)


@pytest.mark.parametrize("source", ["next-llama", "next-mistral"])
def test_a_llava_next_strip_keeps_exactly_the_language_model(stripped, source):
    src, out = stripped[source]
    held = scan_folder(src).tensors
    assert "model.image_newline" in held
    assert any(k.startswith("model.vision_tower.vision_tower.") for k in held)
    assert strict_problems(out) == []
    kept = set(scan_folder(out).tensors)
    assert kept == {k for k in held if keys.PLAIN(k) is not None}
    config = json.loads((out / "config.json").read_text())
    assert not [k for k in config if "mm_" in k or "vision" in k or k.startswith("image_")]


def test_logit_check_catches_a_changed_weight(stripped, tmp_path):
    src, out = stripped["original-llama"]
    planted = tmp_path / "planted"
    shutil.copytree(out, planted)
    norm = scan_folder(planted).tensors["model.norm.weight"].pieces[0]
    with open(norm.path, "r+b") as fh:  # the copy, not the stripped output or the source
        fh.seek(norm.offset)
        fh.write(bytes(b ^ 0x40 for b in fh.read(4)))
    assert not torch.equal(plain_logits(planted, torch.float32),
                           llava_text_logits(src, torch.float32))


# --- hypothesis: any layout the builder can make --------------------------------------------


@st.composite
def layouts(draw):
    shards = draw(st.integers(1, 4))
    placement = draw(st.sampled_from(["last", "first", "middle", "split"]))
    projector = draw(st.sampled_from(["linear", "mlp2x_gelu", "mlp3x_gelu", "identity"]))
    assume(placement != "middle" or shards >= 3)
    assume(placement != "split" or (shards >= 2 and projector != "identity"))
    model = {"projector_type": projector,
             "dtype": draw(st.sampled_from(["float32", "float16", "bfloat16"]))}
    if projector == "identity":
        model["mm_hidden_size"] = 64
    if draw(st.booleans()):
        model |= MISTRAL
    # llava-hf sources come from `convert` (the published layout), which needs mlp2x_gelu.
    layout = draw(st.sampled_from(["original", "hf"]))
    if layout == "hf":
        model = {k: v for k, v in model.items() if k != "mm_hidden_size"}
        model["projector_type"] = "mlp2x_gelu"
    return {"model": model, "format": draw(st.sampled_from(["bin", "safetensors"])),
            "shards": shards, "placement": placement, "legacy": draw(st.booleans()),
            "keep": draw(st.booleans()), "layout": layout,
            "to_format": draw(st.sampled_from([None, "bin", "safetensors"]))}


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(layout=layouts())
def test_strip_any_generated_layout(layout, tmp_path_factory):
    from harness.ops.convert import convert

    work = tmp_path_factory.mktemp("any")
    hf = layout["layout"] == "hf"
    event(f"source layout {layout['layout']}")
    src = bare_build(work / "src", layout["model"], tower=hf, format=layout["format"],
                     shards=layout["shards"], placement=layout["placement"],
                     legacy_buffers=layout["legacy"])
    if hf:
        src = convert(src, work / "hf", "hf").out
    before = tree_hashes(src)
    strip(src, work / "out", keep_legacy_buffers=layout["keep"],
          to_format=layout["to_format"])
    assert tree_hashes(src) == before
    assert strict_problems(work / "out", allow_legacy=layout["keep"]) == []
    assert tensor_bytes(work / "out") == expected_plain(tensor_bytes(src), layout["layout"],
                                                        layout["keep"])


# --- planted defects: each check fails when it should ------------------------------------------


@pytest.fixture
def plain(tmp_path) -> Path:
    strip(bare_build(tmp_path / "src"), tmp_path / "out")
    return tmp_path / "out"


def _leaky_plain(monkeypatch, template: str, target: str | None) -> None:
    rules = {r.source: r.target for r in keys.PLAIN.rules}
    rules[template] = target
    monkeypatch.setattr(keys, "PLAIN", keys.KeyMap("planted", rules))


def test_strict_check_catches_a_leftover_projector_key(tmp_path, monkeypatch):
    src = bare_build(tmp_path / "src")
    _leaky_plain(monkeypatch, keys.PROJECTOR, keys.PROJECTOR)
    strip(src, tmp_path / "out", verify=False)
    problems = strict_problems(tmp_path / "out")
    assert problems and all("unexpected model.mm_projector." in p for p in problems)
    # With the check on, the same defect leaves no output at all.
    with pytest.raises(StripError, match="unexpected model.mm_projector"):
        strip(src, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_strict_check_catches_a_missing_key(tmp_path, monkeypatch):
    src = bare_build(tmp_path / "src")
    _leaky_plain(monkeypatch, "lm_head.weight", None)
    strip(src, tmp_path / "out", verify=False)
    assert strict_problems(tmp_path / "out") == [f"{tmp_path / 'out'}: missing lm_head.weight"]


def test_strict_check_catches_legacy_buffers_unless_allowed(tmp_path):
    strip(bare_build(tmp_path / "src"), tmp_path / "out", keep_legacy_buffers=True)
    assert strict_problems(tmp_path / "out", allow_legacy=True) == []
    problems = strict_problems(tmp_path / "out")
    assert len(problems) == 2 and all("unexpected" in p and "inv_freq" in p for p in problems)


@pytest.mark.parametrize("field, value, message", [
    ("mm_vision_tower", "openai/clip-vit-large-patch14-336", "LLaVA-only field 'mm_vision_tower'"),
    ("image_aspect_ratio", "pad", "LLaVA-only field 'image_aspect_ratio'"),
    ("model_type", "llava", "model_type 'llava', expected llama or mistral"),
    ("architectures", ["LlavaLlamaForCausalLM"], "architectures ['LlavaLlamaForCausalLM']"),
], ids=["mm-field", "image-field", "model-type", "architectures"])
def test_strict_check_catches_a_wrong_config_field(plain, field, value, message):
    rewrite_config(plain, **{field: value})
    problems = strict_problems(plain)
    assert len(problems) == 1 and message in problems[0] and "config.json" in problems[0]


@pytest.mark.parametrize("field, value, message", [
    ("torch_dtype", "float16", "model.norm.weight is float32[64], the model expects float16[64]"),
    ("vocab_size", 500, "lm_head.weight is float32[512, 64], the model expects float32[500, 64]"),
], ids=["dtype", "shape"])
def test_strict_check_catches_dtype_and_shape_mismatches(plain, field, value, message):
    rewrite_config(plain, **{field: value})
    assert any(p.endswith(message) for p in strict_problems(plain))


def test_input_hash_check_catches_a_written_input(tmp_path):
    src = bare_build(tmp_path / "src")
    before = tree_hashes(src)
    with open(src / "pytorch_model-00002-of-00002.bin", "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        fh.write(b"\x01")
    assert tree_hashes(src) != before


def test_byte_comparison_catches_a_changed_tensor(plain, tmp_path):
    want = expected_plain(tensor_bytes(tmp_path / "src"), "original", False)
    piece = scan_folder(plain).tensors["lm_head.weight"].pieces[0]
    with open(piece.path, "r+b") as fh:
        fh.seek(piece.offset + piece.nbytes - 1)
        fh.write(b"\x7f")
    assert tensor_bytes(plain) != want


# --- bad input: one line naming the file and key -----------------------------------------------


def _add_to_bin(path: Path, index: Path, extra: dict) -> None:
    state = torch.load(path, weights_only=True)
    torch.save({**state, **extra}, path)
    data = json.loads(index.read_text())
    data["weight_map"].update({k: path.name for k in extra if isinstance(k, str)})
    index.write_text(json.dumps(data))


def test_a_key_no_rule_covers_is_refused_by_name(tmp_path, capsys):
    src = bare_build(tmp_path / "src")
    shard, index = src / "pytorch_model-00001-of-00002.bin", src / "pytorch_model.bin.index.json"
    _add_to_bin(shard, index, {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2)})
    with pytest.raises(KeyMapError, match=r"pytorch_model-00001-of-00002\.bin: "
                                          r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight"):
        strip(src, tmp_path / "out")
    assert main(["strip", str(src), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lora_A" in err
    assert not (tmp_path / "out").exists()


def test_a_pickle_with_other_objects_is_refused(tmp_path):
    src = bare_build(tmp_path / "src")
    shard = src / "pytorch_model-00002-of-00002.bin"
    torch.save({**torch.load(shard, weights_only=True), "extra": collections.Counter()}, shard)
    with pytest.raises(CheckpointError, match=r"00002-of-00002\.bin: data\.pkl holds "
                                              r"collections\.Counter, not plain weights"):
        strip(src, tmp_path / "out")


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_a_truncated_shard_is_one_clear_error(tmp_path, fmt):
    src = bare_build(tmp_path / "src", format=fmt)
    shard = next(p for p in sorted(src.iterdir()) if p.name.endswith(f"2.{fmt}"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        strip(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_and_tensor_layouts_must_agree(tmp_path):
    src = bare_build(tmp_path / "src")
    rewrite_config(src, text_config={"model_type": "llama"})
    with pytest.raises(KeyMapError, match="describes the llava-hf layout but the tensors are "
                                          "named in the original LLaVA layout"):
        strip(src, tmp_path / "out")


def test_mpt_is_refused(tmp_path):
    src = bare_build(tmp_path / "src")
    rewrite_config(src, model_type="llava_mpt", architectures=["LlavaMptForCausalLM"])
    with pytest.raises(Exception, match="MPT-based LLaVA is not supported"):
        strip(src, tmp_path / "out")


def test_existing_output_is_refused_without_force(plain, tmp_path, capsys):
    before = tree_hashes(plain)
    with pytest.raises(OutputExistsError):
        strip(tmp_path / "src", plain)
    assert main(["strip", str(tmp_path / "src"), "-o", str(plain)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert tree_hashes(plain) == before
    assert main(["strip", str(tmp_path / "src"), "-o", str(plain), "--force",
                 "--keep-legacy-buffers"]) == 0
    assert "strict check passed" in capsys.readouterr().out
    assert strict_problems(plain, allow_legacy=True) == []


def test_without_in_kernel_copy_or_hard_links_the_output_is_the_same(tmp_path, monkeypatch):
    src = bare_build(tmp_path / "src", format="safetensors")
    strip(src, tmp_path / "fast", keep_legacy_buffers=True)

    def refuse(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")  # EXDEV, as across filesystems

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(os, "link", refuse)
    result = strip(src, tmp_path / "slow", keep_legacy_buffers=True)
    assert sorted(result.shards.values()) == ["copied", "rewritten"]
    assert tree_hashes(tmp_path / "slow") == tree_hashes(tmp_path / "fast")
    assert not (tmp_path / "slow" / "model-00001-of-00002.safetensors").samefile(
        src / "model-00001-of-00002.safetensors")


# --- the .bin writer: a torch zip any reader takes ----------------------------------------------


@pytest.mark.parametrize("zip64", [False, True], ids=["zip32", "zip64-forced"])
def test_written_bin_shards_are_valid_torch_zips(tmp_path, monkeypatch, zip64):
    if zip64:  # every record and offset past the limit: exercises the zip64 fields at tiny size
        monkeypatch.setattr(torch_zip, "_ZIP64_LIMIT", 1)
    src = bare_build(tmp_path / "src", format="safetensors")
    strip(src, tmp_path / "out", to_format="bin", keep_legacy_buffers=True)
    want = tensor_bytes(src)
    for shard in sorted((tmp_path / "out").glob("*.bin")):
        with zipfile.ZipFile(shard) as zf:
            assert zf.testzip() is None
        # Data 64-byte aligned, as torch writes it (mmap'd tensors stay aligned).
        assert all(s.pieces[0].offset % 64 == 0 for s in scan_folder(tmp_path / "out")
                   .files[shard.name].values())
        for mmap in (False, True):
            state = torch.load(shard, weights_only=True, mmap=mmap)
            for key, tensor in state.items():
                dtype, shape, data = want[key]
                assert (str(tensor.dtype), tuple(tensor.shape)) == (f"torch.{dtype}", shape)
                assert tensor.contiguous().view(torch.uint8).numpy().tobytes() == data


def test_copied_bin_records_keep_their_page_offset(plain, tmp_path):
    """Whole records are placed at the same offset within a page as in the source, so the
    kernel copies whole pages; everything stays 64-byte aligned."""
    source = scan_folder(tmp_path / "src").tensors
    for key, out in scan_folder(plain).tensors.items():
        assert out.pieces[0].offset % 4096 == source[key].pieces[0].offset % 4096, key


# --- real size -------------------------------------------------------------------------------------


@pytest.mark.realsize
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_realsize_strip_is_llama2_7b(realsize_checkpoint_factory, tmp_path, fmt):
    src = realsize_checkpoint_factory("llava-v1.5-7b", checkpoint={"format": fmt})
    out = tmp_path / "plain-7b"
    try:
        strip(src, out)  # includes the strict check against LlamaForCausalLM on meta
        assert parameter_count(out) == LLAVA_7B_LM_PARAMS
        assert strict_problems(out) == []
        first = min(out.glob(f"*.{fmt}"))
        if fmt == "bin":  # the 10 GB shard: torch reads the zip64 offsets this writer wrote
            state = torch.load(first, weights_only=True, mmap=True)
            assert len(state) == len(scan_folder(out).files[first.name])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_the_strict_checks_target_class_is_remembered(tmp_path, monkeypatch):
    """The target class is built on the meta device once per (config, transformers, torch);
    the next strip of the same architecture reads it from the cache and gives the same state,
    and a different config builds anew."""
    from harness.ops import strip as strip_ops

    monkeypatch.setenv("LLAVA_HARNESS_CACHE", str(tmp_path / "cache"))
    src = bare_build(tmp_path / "src")
    strip(src, tmp_path / "out", verify=False)
    built = []
    real = strip_ops._meta_state
    monkeypatch.setattr(strip_ops, "_meta_state", lambda f: built.append(f) or real(f))
    first = strip_ops.expected_state(tmp_path / "out")
    assert strip_ops.expected_state(tmp_path / "out") == first and len(built) == 1
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    (tmp_path / "out" / "config.json").write_text(json.dumps({**config, "vocab_size": 640}))
    assert strip_ops.expected_state(tmp_path / "out")["lm_head.weight"][0] == (640, 64)
    assert len(built) == 2


def test_bench_strip_measures_strip_against_its_floors(bench_json, tmp_path):
    """`bench strip` on the tiny preset: strip, the naive load/filter/save and a raw copy of
    the output's bytes, each measured; the ratios are those of the walls it recorded, and no
    output is left beside the cached build (no suite ran the command before)."""
    case, value, _ = bench_json("strip", "--preset", "tiny", "--format", "safetensors",
                                "--legacy", "drop")
    assert case == "tiny-safetensors-drop-legacy"
    assert value["strip_over_raw"] == pytest.approx(value["strip_wall_s"] / value["raw_wall_s"])
    assert value["strip_over_naive"] == pytest.approx(
        value["strip_wall_s"] / value["naive_wall_s"])
    assert value["bytes"] > 0 and value["strip_peak_rss"] > 0
    assert {p.name for p in tmp_path.iterdir()} <= {
        "expected-state", *(p.name for p in tmp_path.glob("tiny-safetensors-*"))}
