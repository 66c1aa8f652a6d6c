"""Tests for harness.synth.assets: locally built tokenizer and CLIP vision tower folders."""

import hashlib
import json

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import Tokenizer

from harness.synth.assets import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE, build_clip_tower, build_tokenizer

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")

# Plain text: digits, punctuation, byte-fallback unicode (é, emoji, CJK), newlines, tabs,
# runs of spaces inside and at the end.
SAMPLES = [
    "Hello world",
    "The year 2024 had 366 days, not 365.",
    "What is in the image?\nAnswer the question using a single word.",
    "café au lait",
    "I love 🦙 and 🐱!",
    "Ünïcödé ñ 中文",
    "line one\nline two\n",
    "\n\nstarts with newlines",
    "tabs\tand\tmore",
    "a  b   c",
    "trailing spaces  ",
    "x" * 40,
    "",
]
# Text that begins with whitespace: sentencepiece keeps its dummy prefix ("▁▁word"),
# transformers 5's LlamaTokenizer (Metaspace pre-tokenizer) does not add one.
LEADING_WS = [" leading space", "  two leading spaces", " ", " \nx"]

CLIP_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, image_size=28, patch_size=14)


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module", params=[320, 512], ids=["lowercase-tier", "rich-tier"])
def tok_dir(request, tmp_path_factory):
    # 320 is below the rich corpus minimum (lowercase-only corpus), 512 above it.
    out = tmp_path_factory.mktemp(f"tok{request.param}")
    build_tokenizer(out, request.param)
    return out, request.param


@pytest.fixture(scope="module")
def toks(tok_dir):
    from transformers import AutoTokenizer

    out, vocab_size = tok_dir
    fast = AutoTokenizer.from_pretrained(out)
    # transformers 5 ignores use_fast=False (there is no slow Llama class any more);
    # the real slow reference is the sentencepiece model itself, checked separately.
    slow = AutoTokenizer.from_pretrained(out, use_fast=False)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    return fast, slow, sp, raw, vocab_size


def test_tokenizer_file_set_and_config(tok_dir):
    out, _ = tok_dir
    assert sorted(p.name for p in out.iterdir()) == sorted(TOKENIZER_FILES)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "LlamaTokenizer"
    assert cfg["model_max_length"] == 2048
    assert cfg["padding_side"] == "right"
    assert cfg["legacy"] is False
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False
    assert cfg["pad_token"] is None
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert {k: v["content"] for k, v in special.items()} == {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def test_tokenizer_vocab_and_special_ids(toks):
    fast, slow, sp, raw, vocab_size = toks
    assert sp.get_piece_size() == vocab_size
    assert raw.get_vocab_size() == vocab_size
    for tok in (fast, slow):
        assert len(tok) == vocab_size
        assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
        assert tok.pad_token is None
        assert tok.padding_side == "right"
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    # Llama layout: the 256 byte pieces follow the three specials.
    assert sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(258) == "<0xFF>"


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenizer_ids_agree(toks, text):
    fast, slow, sp, raw, _ = toks
    expected = [sp.bos_id()] + sp.encode(text)  # what the slow Llama tokenizer produced
    assert fast(text)["input_ids"] == expected
    assert slow(text)["input_ids"] == expected
    assert raw.encode(text).ids == expected


@pytest.mark.parametrize("text", LEADING_WS)
def test_tokenizer_leading_whitespace(toks, text):
    fast, _, sp, raw, _ = toks
    expected = [sp.bos_id()] + sp.encode(text)
    # Our tokenizer.json (Llama-2 layout) matches sentencepiece exactly ...
    assert raw.encode(text).ids == expected
    # ... transformers 4.x does too; transformers 5 rebuilds a Metaspace pipeline that
    # skips the dummy "▁" when the text already starts with a space.  Accept both.
    proto = sp_pb2.ModelProto.FromString(sp.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    no_dummy = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    assert fast(text)["input_ids"] in (expected, [sp.bos_id()] + no_dummy.encode(text))
    assert sp.decode(expected[1:]) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenizer_round_trip(toks, text):
    fast, slow, sp, raw, _ = toks
    ids = fast(text)["input_ids"]
    assert ids[:1] == [1] and 2 not in ids  # BOS prepended, no EOS
    assert fast.decode(ids, skip_special_tokens=True) == text
    assert slow.decode(ids, skip_special_tokens=True) == text
    assert raw.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_byte_fallback(toks):
    fast, _, sp, _, _ = toks
    ids = fast("🦙", add_special_tokens=False)["input_ids"]
    # The emoji is not in the ASCII training corpus: 4 UTF-8 bytes -> 4 byte pieces
    # (possibly after a "▁" piece), never <unk>.
    pieces = [sp.id_to_piece(i) for i in ids]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert 0 not in ids


def test_tokenizer_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_tokenizer(a, 400)
    build_tokenizer(b, 400)
    for name in TOKENIZER_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_tokenizer_model_max_length(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path, 300, model_max_length=4096)
    assert AutoTokenizer.from_pretrained(tmp_path).model_max_length == 4096


def test_tokenizer_exact_size_across_corpus_tiers(tmp_path):
    # Sweeps past the switch from the lowercase-only corpus to the full one (~334),
    # where an off-by-one in the required-character count would make training fail.
    for vocab_size in range(MIN_VOCAB_SIZE, MIN_VOCAB_SIZE + 64):
        build_tokenizer(tmp_path / str(vocab_size), vocab_size)
        model = tmp_path / str(vocab_size) / "tokenizer.model"
        assert spm.SentencePieceProcessor(model_file=str(model)).get_piece_size() == vocab_size


def test_tokenizer_min_size_and_range_errors(tmp_path):
    build_tokenizer(tmp_path, MIN_VOCAB_SIZE)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert sp.get_piece_size() == MIN_VOCAB_SIZE
    for bad in (MIN_VOCAB_SIZE - 1, MAX_VOCAB_SIZE + 1, 0):
        with pytest.raises(ValueError, match=rf"{bad}.*\[{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}\]"):
            build_tokenizer(tmp_path / "bad", bad)


# ---------------------------------------------------------------------------- CLIP tower


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    build_clip_tower(out, **CLIP_TINY, projection_dim=16)
    return out


def test_clip_loads_and_runs(clip_dir):
    # The three calls LLaVA's CLIPVisionTower makes on `mm_vision_tower`.
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig.from_pretrained(clip_dir)
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    model, info = CLIPVisionModel.from_pretrained(clip_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert (config.hidden_size, config.num_hidden_layers, config.projection_dim) == (32, 2, 16)
    assert model.dtype == torch.float16

    rng = np.random.RandomState(0)
    image = Image.fromarray(rng.randint(0, 256, (45, 60, 3), dtype=np.uint8))
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 28, 28)
    with torch.no_grad():
        out = model.float()(pixels, output_hidden_states=True)
    assert len(out.hidden_states) == CLIP_TINY["num_hidden_layers"] + 1
    n_patches = (CLIP_TINY["image_size"] // CLIP_TINY["patch_size"]) ** 2
    assert tuple(out.hidden_states[-2].shape) == (1, n_patches + 1, 32)  # + CLS
    assert torch.isfinite(out.last_hidden_state).all()
    assert out.last_hidden_state.std() > 0.1  # non-degenerate activations


def test_clip_preprocessor_config(clip_dir):
    cfg = json.loads((clip_dir / "preprocessor_config.json").read_text())
    assert cfg["crop_size"] == {"height": 28, "width": 28}
    assert cfg["size"] == {"shortest_edge": 28}
    assert cfg["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert cfg["image_std"] == [0.26862954, 0.26130258, 0.27577711]
    assert cfg["resample"] == 3 and cfg["rescale_factor"] == pytest.approx(1 / 255)
    for flag in ("do_center_crop", "do_normalize", "do_resize", "do_convert_rgb"):
        assert cfg[flag] is True


def test_clip_weight_statistics(clip_dir):
    from safetensors.torch import load_file

    weights = load_file(clip_dir / "model.safetensors")
    # Published key layout (transformers 4.x and 5.x both read and write it).
    assert all(k.startswith("vision_model.") for k in weights)
    assert all(t.dtype == torch.float16 for t in weights.values())
    ln = weights["vision_model.encoder.layers.0.layer_norm1.weight"].float()
    assert abs(ln.mean() - 1) < 0.02 and ln.std() > 0.005  # near 1, not constant
    fc = weights["vision_model.encoder.layers.0.mlp.fc1.weight"].float()
    assert abs(fc.std() - 0.02) < 0.005 and abs(fc.mean()) < 0.005


def test_clip_deterministic_and_seeded(tmp_path, clip_dir):
    same, other = tmp_path / "same", tmp_path / "other"
    build_clip_tower(same, **CLIP_TINY, projection_dim=16)
    build_clip_tower(other, **CLIP_TINY, projection_dim=16, seed=1)
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        assert _sha256(same / name) == _sha256(clip_dir / name), name
    assert _sha256(other / "model.safetensors") != _sha256(clip_dir / "model.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_other_dtypes(tmp_path, clip_dir, dtype):
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    build_clip_tower(tmp_path, **CLIP_TINY, dtype=dtype)
    assert CLIPVisionModel.from_pretrained(tmp_path).dtype == dtype
    # Weights are drawn in fp32 and then cast, so every dtype holds the same values.
    key = "vision_model.encoder.layers.1.mlp.fc2.weight"
    a = load_file(tmp_path / "model.safetensors")[key]
    b = load_file(clip_dir / "model.safetensors")[key]
    assert a.dtype == dtype
    assert torch.allclose(a.float(), b.float(), atol=1e-3)


def test_clip_rejects_bad_geometry(tmp_path):
    with pytest.raises(ValueError, match="patch_size"):
        build_clip_tower(tmp_path, **{**CLIP_TINY, "image_size": 30})
