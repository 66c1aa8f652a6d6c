"""Pre-quantized checkpoints: what users publish as "-4bit" / "-8bit" / GPTQ / AWQ.

The builder writes bitsandbytes nf4 (with and without double quant), fp4 and int8 exactly as
transformers' `save_pretrained` does after a quantized load (same keys, dtypes, shapes, bytes
and `quantization_config`: proven by doing that load and save here), and key-level GPTQ / AWQ
layouts; every build is deterministic. `count` reports logical parameters equal to the float
model's and the stored bytes (matched to the quantization formula of harness/ops/quant.py);
`verify` checks every byte; `extract` copies the float projector bit for bit; `strip` keeps
each linear's state and `quantization_config`, and the result loads with bitsandbytes on CPU
and gives the quantized LLaVA's text logits bit for bit; `load` takes the quantization from the
folder. Each check is shown to catch a planted difference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from harness.checkpoint.reader import open_folder, read_file
from harness.bench.quant import parts_from_spec
from harness.ops import quant
from harness.ops.counts import count_checkpoint
from harness.ops.extract import extract
from harness.ops.strip import parameter_count, strip
from harness.synth.builder import build
from harness.synth.presets import build_spec
from harness.synth.verify import verify

IDS = torch.tensor([[1, 17, 42, 7, 300, 5, 511, 2]])
BNB = ("nf4", "nf4-dq", "fp4", "int8")
KEY_LEVEL = ("gptq", "awq")
# tiny's hidden size is 64: GPTQ / AWQ groups of 32 input features.
GROUP = {"gptq": 32, "awq": 32}
MISTRAL = {"arch": "mistral", "num_key_value_heads": 2, "rope_theta": 1e6}
Q_WEIGHT = "model.layers.1.self_attn.q_proj"


def quant_spec(q: str | None, fmt: str = "bin", model: dict | None = None, **checkpoint):
    ck = {"format": fmt, "quantization": q, **checkpoint}
    if q in GROUP:
        ck["quant_group_size"] = GROUP[q]
    return build_spec("tiny-quant", model=model, checkpoint=ck)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(quantization, format) -> folder, built once; None is the float model."""
    root = tmp_path_factory.mktemp("prequantized")
    cache: dict = {}

    def get(q: str | None, fmt: str = "bin", model: dict | None = None) -> Path:
        key = (q, fmt, json.dumps(model, sort_keys=True))
        if key not in cache:
            folder = root / f"llava-{q or 'float'}-{fmt}-{len(cache)}"
            build(quant_spec(q, fmt, model), folder)
            cache[key] = folder
        return cache[key]

    return get


def flip_bits(folder: Path, key: str, at: int = 0, mask: int = 1) -> None:
    """XOR one byte of a stored tensor, in place (callers pass a copy)."""
    source = open_folder(folder).tensors[key]
    place = source.storage or source.pieces[0]
    with open(place.path, "r+b") as fh:
        fh.seek(place.offset + at)
        byte = fh.read(1)[0]
        fh.seek(place.offset + at)
        fh.write(bytes([byte ^ mask]))


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    f = open_folder(folder)
    return f.read(sorted(f.tensors))


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose presence, dtype, shape or bytes differ."""
    out = sorted(set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if (x.dtype, x.shape) != (y.dtype, y.shape) or not torch.equal(
                x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)):
            out.append(key)
    return out


# --- the builder writes what transformers saves -------------------------------------------

def transformers_save(float_folder: Path, mode: str, out: Path) -> Path:
    """A quantized load of the float build and save_pretrained, as users make "-4bit"."""
    from harness.ops.load import load

    loaded = load(float_folder, None, "llava-tiny", device="cpu", dtype=torch.float32,
                  quantization_config=quant.bnb_config(mode, "float32"))
    loaded.model.save_pretrained(out)
    return out


@pytest.mark.parametrize("mode", BNB)
def test_builder_writes_what_transformers_saves(tmp_path, mode):
    float_folder = tmp_path / "llava-float"
    spec = quant_spec(None, "safetensors", shards=1, legacy_buffers=False)
    build(spec, float_folder)
    saved = tensors_of(transformers_save(float_folder, mode, tmp_path / "saved"))
    # The harness model carries its vision tower (read from mm_vision_tower); a LLaVA
    # checkpoint of the 1.5 line does not store it.
    saved = {k: v for k, v in saved.items() if not k.startswith("model.vision_tower.")}
    ours = tmp_path / "ours"
    build(dataclasses.replace(spec, checkpoint=spec.checkpoint.replace(quantization=mode)), ours)
    assert differences(tensors_of(ours), saved) == []
    config = lambda folder: json.loads((folder / "config.json").read_text())  # noqa: E731
    assert config(ours)["quantization_config"] == config(tmp_path / "saved")[
        "quantization_config"]
    # The comparison sees a one-bit change in one quant-state tensor.
    key = f"{Q_WEIGHT}.SCB" if mode == "int8" else f"{Q_WEIGHT}.weight.absmax"
    planted = dict(saved)
    planted[key] = saved[key].clone()
    planted[key].view(-1).view(torch.uint8)[0] ^= 1
    assert differences(tensors_of(ours), planted) == [key]


@pytest.mark.parametrize("q", BNB + KEY_LEVEL)
def test_builds_are_deterministic(tmp_path, q):
    def digests(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.iterdir()) if p.is_file()}

    spec = dataclasses.replace(quant_spec(q, "safetensors"), with_tokenizer=False,
                               with_vision_tower=False)
    build(spec, tmp_path / "a")
    build(spec, tmp_path / "b")
    assert digests(tmp_path / "a") == digests(tmp_path / "b")


# --- count, verify, extract -------------------------------------------------------------------

@pytest.mark.parametrize("q", BNB + KEY_LEVEL)
def test_count_is_logical_and_reports_stored_bytes(built, q):
    folder, plain = built(q), built(None)
    counts, float_counts = count_checkpoint(folder), count_checkpoint(plain)
    assert counts.params == float_counts.params
    assert counts.agree and counts.quantization["scheme"].endswith(q)
    stored = counts.quantization["stored_bytes"]
    assert stored["total"] == open_folder(folder).total_size
    linears = [(o, i) for o, i in parts_from_spec(quant_spec(q).model).linears
               if (o, i) != (64, 32)]  # the projector's first layer stays float
    assert counts.quantization["quantized_params"] == sum(o * i for o, i in linears)
    if q in BNB:
        # The same bytes harness/ops/quant.py's formula gives, plus what the formula leaves
        # out because it lives in Python objects once loaded: the JSON quant state, int8's
        # one-byte weight_format; double quant's offset sits in that JSON, not in a tensor.
        formula = [quant.linear_bytes(q, o, i, "float32") for o, i in linears]
        assert stored["packed_weights"] == sum(b.weight for b in formula)
        scheme = counts.quantization["scheme"]
        state = open_folder(folder).tensors
        extra = sum(s.nbytes for k, s in state.items() if k.endswith(
            ("quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4", "weight_format")))
        offsets = 4 * len(linears) if scheme.endswith("-dq") else 0
        assert stored["quant_state"] == sum(b.state for b in formula) + extra - offsets


@pytest.mark.parametrize("q", ("nf4-dq", "int8", "gptq"))
def test_verify_checks_every_byte_and_catches_one(built, tmp_path, q):
    spec = quant_spec(q)
    assert verify(spec, built(q)) == []
    planted = tmp_path / "planted"
    shutil.copytree(built(q), planted)
    key = f"{Q_WEIGHT}.qzeros" if q == "gptq" else f"{Q_WEIGHT}.weight"
    flip_bits(planted, key)
    assert verify(spec, planted) == [f"{planted / open_folder(planted).file_of(key)}: {key} "
                                     "differs from the bytes its seed and key generate"]


@pytest.mark.parametrize("fmt", ("bin", "safetensors"))
@pytest.mark.parametrize("q", BNB + KEY_LEVEL)
def test_extract_is_bit_for_bit_the_float_projector(built, tmp_path, q, fmt):
    extract(built(q, fmt), tmp_path / "q.bin")
    extract(built(None, fmt), tmp_path / "f.bin")
    got, want = read_file(tmp_path / "q.bin"), read_file(tmp_path / "f.bin")
    assert sorted(got) == sorted(want) and len(got) == 4
    assert differences(got, want) == []


# --- strip, and load ---------------------------------------------------------------------

def llava_text_logits(folder: Path) -> torch.Tensor:
    from harness.ops.load import load

    loaded = load(folder, None, "llava-tiny", device="cpu", dtype=torch.float32)
    with torch.no_grad():
        return loaded.model.eval()(IDS).logits


def plain_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                       device_map={"": "cpu"},
                                                       output_loading_info=True)
    assert {k: list(v) for k, v in info.items() if v} == {}
    with torch.no_grad():
        return model.eval()(IDS).logits


STRIP_CASES = [pytest.param(q, fmt, arch, id=f"{q}-{fmt}-{arch}")
               for q, fmt, arch in (("nf4", "bin", "llama"), ("nf4-dq", "safetensors", "llama"),
                                    ("fp4", "bin", "llama"), ("int8", "safetensors", "llama"),
                                    ("nf4-dq", "bin", "mistral"),
                                    ("int8", "bin", "mistral"))]


@pytest.mark.parametrize("q, fmt, arch", STRIP_CASES)
def test_strip_keeps_quant_state_and_text_logits_equal(built, tmp_path, q, fmt, arch):
    src = built(q, fmt, MISTRAL if arch == "mistral" else None)
    strip(src, tmp_path / "plain")
    source, out = tensors_of(src), tensors_of(tmp_path / "plain")
    kept = {k: v for k, v in source.items()
            if "mm_projector" not in k and not k.endswith("rotary_emb.inv_freq")}
    assert differences(out, kept) == []
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["quantization_config"] == json.loads(
        (src / "config.json").read_text())["quantization_config"]
    want = llava_text_logits(src)
    assert torch.equal(plain_logits(tmp_path / "plain"), want)
    # ... and the comparison catches one flipped bit in one packed weight.
    # (in mlp.down_proj, whose output every position adds to its residual stream)
    flip_bits(tmp_path / "plain", "model.layers.1.mlp.down_proj.weight", at=5, mask=0x11)
    assert not torch.equal(plain_logits(tmp_path / "plain"), want)


@pytest.mark.parametrize("q", KEY_LEVEL)
def test_strip_key_level_layouts(built, tmp_path, q):
    result = strip(built(q), tmp_path / "plain")
    assert result.verified
    out = tensors_of(tmp_path / "plain")
    assert f"{Q_WEIGHT}.qweight" in out and f"{Q_WEIGHT}.weight" not in out
    assert differences(out, {k: v for k, v in tensors_of(built(q)).items()
                             if "mm_projector" not in k and "inv_freq" not in k}) == []


@pytest.mark.parametrize("q", ("nf4-dq", "int8"))
def test_load_takes_the_quantization_from_the_folder(built, q):
    from harness.ops.load import load

    loaded = load(built(q), None, "llava-tiny", device="cpu", dtype=torch.float32)
    assert loaded.quantization == f"bnb-{q}"
    layer = loaded.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == ("Linear4bit" if q != "int8" else "Linear8bitLt")
    assert type(loaded.model.model.mm_projector[0]).__name__ == "Linear"


# --- real size ---------------------------------------------------------------------------

LLAMA2_7B_PARAMS = 6_738_415_616
LLAVA_7B_PROJECTOR = 20_979_712


@pytest.mark.realsize
def test_realsize_7b_nf4_dq_counts_strips_and_extracts(realsize_checkpoint_factory, tmp_path):
    src = realsize_checkpoint_factory("llava-v1.5-7b", checkpoint={"quantization": "nf4-dq"})
    counts = count_checkpoint(src)
    assert counts.total_params == LLAMA2_7B_PARAMS + LLAVA_7B_PROJECTOR  # logical, as float
    stored = counts.quantization["stored_bytes"]
    assert stored["total"] == sum(s.nbytes for s in open_folder(src).tensors.values())
    out = tmp_path / "plain-7b-nf4-dq"
    try:
        result = strip(src, out)  # with its strict check of the stored layout
        assert result.verified and parameter_count(out) == LLAMA2_7B_PARAMS
    finally:
        shutil.rmtree(out, ignore_errors=True)
    float_src = realsize_checkpoint_factory("llava-v1.5-7b")
    extract(src, tmp_path / "q.bin")
    extract(float_src, tmp_path / "f.bin")
    assert differences(read_file(tmp_path / "q.bin"), read_file(tmp_path / "f.bin")) == []
