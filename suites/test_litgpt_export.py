"""`strip --layout litgpt`: LLaVA -> litgpt's `lit_model.pth` + `model_config.yaml`.

Without litgpt: the export's key set and shapes are litgpt's GPT's, every tensor's bytes are the
plain strip's (q/k/v fused exactly as litgpt's converter does, `torch.cat((q, k, v))`), both
source layouts, llama and mistral, torch never imported. With litgpt (its own environment:
`llava-harness litgpt setup`, which CI runs): `litgpt.GPT` loads the export with
`load_state_dict(strict=True)` and its float32 logits equal transformers' on the plain strip
within `[litgpt.logits.float32]` of tolerances.toml, and the comparison catches a one-ulp change
of one weight.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from harness.checkpoint.crc import combined
from harness.checkpoint.reader import open_folder, read_file
from harness.cli.app import main
from harness.ops import litgpt_env
from harness.ops.litgpt import CONFIG, WEIGHTS, expected_state, export_litgpt
from harness.ops.strip import strip
from harness.synth.builder import build
from harness.synth.presets import build_spec
from harness.tolerances import tolerance

IDS = [1, 17, 42, 7, 300, 5, 511, 2]
MISTRAL = {"arch": "mistral", "num_key_value_heads": 2, "rope_theta": 1e6}
SOURCES = {"original-llama-bin": ("original", None, "bin"),
           "original-mistral-safetensors": ("original", MISTRAL, "safetensors"),
           "hf-llama-safetensors": ("hf", None, "safetensors"),
           "hf-mistral-bin": ("hf", MISTRAL, "bin")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """source name -> (LLaVA folder, plain strip, litgpt export), made once per module."""
    root = tmp_path_factory.mktemp("litgpt")
    out = {}
    for name, (layout, model, fmt) in SOURCES.items():
        spec = dataclasses.replace(build_spec("tiny", model=model, checkpoint={"format": fmt}),
                                   with_tokenizer=name == "original-llama-bin")
        src = root / f"{name}-src"
        build(spec, src)
        if layout == "hf":
            assert main(["convert", str(src), "-o", str(root / f"{name}-hf"), "--to", "hf"]) == 0
            src = root / f"{name}-hf"
        strip(src, root / f"{name}-plain")
        export_litgpt(src, root / f"{name}-litgpt")
        out[name] = (src, root / f"{name}-plain", root / f"{name}-litgpt")
    return out


def plain_tensors(folder: Path) -> dict[str, torch.Tensor]:
    f = open_folder(folder)
    return f.read(sorted(f.tensors))


def litgpt_yaml(folder: Path) -> dict:
    import yaml  # litgpt reads it with PyYAML's safe_load; so does this check

    return yaml.safe_load((folder / CONFIG).read_text())


@pytest.mark.parametrize("source", SOURCES)
def test_export_is_litgpts_state_dict_with_the_strips_bytes(exported, source):
    _, plain, lit = exported[source]
    got = read_file(lit / WEIGHTS)
    config = litgpt_yaml(lit)
    assert {k: tuple(v.shape) for k, v in got.items()} == expected_state(config)
    want = plain_tensors(plain)
    for i in range(config["n_layer"]):
        p = f"model.layers.{i}."
        qkv = torch.cat([want[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        assert torch.equal(got[f"transformer.h.{i}.attn.qkv.weight"], qkv)
        assert torch.equal(got[f"transformer.h.{i}.mlp.fc_1.weight"], want[p + "mlp.gate_proj.weight"])
        assert torch.equal(got[f"transformer.h.{i}.mlp.fc_2.weight"], want[p + "mlp.up_proj.weight"])
    assert torch.equal(got["lm_head.weight"], want["lm_head.weight"])
    assert sum(v.numel() for v in got.values()) == sum(v.numel() for v in want.values())
    plain_config = json.loads((plain / "config.json").read_text())
    assert config["n_query_groups"] == plain_config["num_key_value_heads"]
    assert config["rope_base"] == plain_config["rope_theta"]
    assert config["norm_eps"] == plain_config["rms_norm_eps"]


@pytest.mark.parametrize("source", ["original-llama-bin", "original-mistral-safetensors"])
def test_every_zip_record_crc_is_right(exported, source):
    # From .bin shards the fused q/k/v record's CRC is combined from its parts' stored CRCs
    # (copied in the kernel); from safetensors it is computed while writing.
    assert zipfile.ZipFile(exported[source][2] / WEIGHTS).testzip() is None


@pytest.mark.parametrize("sizes", [(0, 5), (1, 0, 7), (333, 65536, 1, 4097)])
def test_crc32_combine_is_zlibs(sizes):
    parts = [os.urandom(n) for n in sizes]
    assert combined([(zlib.crc32(p), len(p)) for p in parts]) == zlib.crc32(b"".join(parts))


def test_export_streams_without_torch(exported, tmp_path):
    src = exported["original-llama-bin"][0]
    code = ("import sys; from pathlib import Path; from harness.ops.litgpt import export_litgpt; "
            f"export_litgpt(Path({str(src)!r}), Path({str(tmp_path / 'lit')!r})); "
            "assert 'torch' not in sys.modules, 'the export imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "lit" / WEIGHTS).is_file()


def test_export_of_a_prequantized_checkpoint_is_refused(tmp_path, capsys):
    spec = dataclasses.replace(build_spec("tiny-quant", checkpoint={"quantization": "nf4"}),
                               with_tokenizer=False)
    build(spec, tmp_path / "llava-nf4")
    code = main(["strip", str(tmp_path / "llava-nf4"), "-o", str(tmp_path / "out"),
                 "--layout", "litgpt"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pre-quantized" in err
    assert not (tmp_path / "out").exists()


def test_hf_only_options_are_refused_with_litgpt(exported, tmp_path, capsys):
    src = exported["original-llama-bin"][0]
    code = main(["strip", str(src), "-o", str(tmp_path / "out"), "--layout", "litgpt",
                 "--to-format", "safetensors"])
    assert code == 2 and "--layout hf" in capsys.readouterr().err


# --- litgpt itself loads it -----------------------------------------------------------------

@pytest.fixture(scope="module")
def litgpt_python():
    if litgpt_env.python() is None:
        pytest.skip(f"litgpt environment not made at {litgpt_env.env_folder()}: run "
                    "'llava-harness litgpt setup' (CI does)")
    return litgpt_env.python()


def transformers_logits(plain: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits


def assert_within(got: torch.Tensor, want: torch.Tensor) -> None:
    bound = tolerance("litgpt.logits.float32")
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, **bound.close_kwargs())


@pytest.mark.parametrize("source", SOURCES)
def test_litgpt_logits_equal_transformers_on_the_plain_strip(exported, litgpt_python, tmp_path,
                                                             source):
    _, plain, lit = exported[source]
    got = litgpt_env.litgpt_logits(lit, IDS, tmp_path / "logits.pt")
    assert_within(got, transformers_logits(plain))


def test_the_comparison_catches_a_one_ulp_weight_change(exported, litgpt_python, tmp_path):
    _, plain, lit = exported["original-llama-bin"]
    planted = tmp_path / "planted"
    shutil.copytree(lit, planted)
    state = read_file(planted / WEIGHTS)
    norm = state["transformer.ln_f.weight"].clone()
    norm[0] = torch.nextafter(norm[0], torch.tensor(float("inf")))  # one ulp up, one weight
    state = {k: v.clone() for k, v in state.items()} | {"transformer.ln_f.weight": norm}
    torch.save(state, planted / WEIGHTS)
    got = litgpt_env.litgpt_logits(planted, IDS, tmp_path / "logits.pt")
    with pytest.raises(AssertionError):
        assert_within(got, transformers_logits(plain))


# --- real size -------------------------------------------------------------------------------

LLAMA2_7B_PARAMS = 6_738_415_616
# litgpt's GPT built on the meta device takes the export's tensors as they are (mmap, assign):
# the strict key check at 7B without 13.5 GB of memory.
STRICT_META = """
import sys, torch
from litgpt import GPT, Config
folder = sys.argv[1]
with torch.device("meta"):
    model = GPT(Config.from_file(f"{folder}/model_config.yaml"))
state = torch.load(f"{folder}/lit_model.pth", weights_only=True, mmap=True)
model.load_state_dict(state, strict=True, assign=True)
print(sum(p.numel() for p in model.parameters()))
"""


@pytest.mark.realsize
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_realsize_7b_export_is_litgpts_llama2_7b(realsize_checkpoint_factory, tmp_path, fmt):
    src = realsize_checkpoint_factory("llava-v1.5-7b", checkpoint={"format": fmt})
    out = tmp_path / "lit-7b"
    try:
        result = export_litgpt(src, out)
        assert result.tensors == 2 + 32 * 7 + 1
        state = read_file(out / WEIGHTS)  # mapped, not read
        assert sum(t.numel() for t in state.values()) == LLAMA2_7B_PARAMS
        assert zipfile.ZipFile(out / WEIGHTS).testzip() is None  # every record's CRC
        if litgpt_env.python() is not None:
            done = subprocess.run([str(litgpt_env.python()), "-I", "-c", STRICT_META, str(out)],
                                  capture_output=True, text=True, env=litgpt_env.child_env())
            assert done.returncode == 0, done.stderr[-2000:]
            assert int(done.stdout.split()[-1]) == LLAMA2_7B_PARAMS
    finally:
        shutil.rmtree(out, ignore_errors=True)
