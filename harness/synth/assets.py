"""Build the auxiliary files a LLaVA checkpoint folder needs, locally and deterministically.

Nothing here touches the network: the tokenizer is trained on text embedded in this
module, and the CLIP vision tower is random-initialised from a seed.  Every build with
the same arguments writes byte-identical files, so checkpoints made by the harness can
be compared by hash.

Public API:
    build_tokenizer(out_dir, vocab_size, model_max_length=2048)
    build_clip_tower(out_dir, *, hidden_size, num_hidden_layers, num_attention_heads,
                     intermediate_size, image_size, patch_size, projection_dim=None,
                     seed=0, dtype=torch.float16)
    MIN_VOCAB_SIZE, MAX_VOCAB_SIZE
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import torch

from ..checkpoint.safetensors_format import save_file_order, write_safetensors
from .content import tensor_chunks
from .layout import clip_tensors, clip_tower_config
from .specs import VisionSpec

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

# Hand-written English, the "realistic" part of the training corpus.  It is ASCII on
# purpose: accented letters and emoji must reach the model through byte fallback,
# exactly as rare characters do in the real Llama tokenizer.
_ENGLISH_TEXT = """\
The quick brown fox jumps over the lazy dog.
Pack my box with five dozen liquor jugs.
Sphinx of black quartz, judge my vow!
How vexingly quick daft zebras jump.
A picture shows two cats sleeping on a red sofa next to a window.
What is the man in the blue jacket holding in his left hand?
The image contains a small wooden boat floating on a calm lake at sunset.
There are 3 dogs, 2 cats and 14 birds in the garden.
Describe the scene in detail, including the colors and the weather.
She bought 12 apples, 7 oranges and a loaf of bread for $5.99 on Monday.
In 1969, astronauts landed on the Moon; the mission lasted about 8 days.
Is it raining? No, the sky is clear and the sun is shining brightly.
The train leaves at 10:45 from platform 9 and arrives at 13:20.
Please answer the question using a single word or phrase.
A young woman is riding a bicycle down a busy city street.
Two children are playing soccer in a park surrounded by tall trees.
The kitchen has white cabinets, a silver refrigerator and a gas stove.
Where is the clock located? It hangs on the wall above the fireplace.
Our results show an improvement of 4.5% over the previous baseline (see Table 2).
The recipe calls for 250 grams of flour, 3 eggs and 100 ml of milk.
"Look out!" shouted the guard, as the heavy gate began to close.
Why did the chicken cross the road? To get to the other side, of course.
The museum opens at 9 a.m. and closes at 6 p.m., except on holidays.
Scientists measured the temperature every hour for 30 consecutive days.
A herd of elephants walks slowly across the dusty savanna at noon.
The laptop on the desk is connected to a monitor, a keyboard and a mouse.
Can you read the text on the sign? It says: "Keep off the grass."
The storm knocked down several power lines, leaving 2,000 homes without light.
He quietly opened the old door, stepped inside and looked around the dark room.
Mountains covered in snow rise behind a village of small stone houses.
The answer is yes; the person in the photo is wearing glasses and a hat.
Prices rose by 0.8 percent in March, according to the latest report.
Vivid green parrots squawked loudly from the branches of a mango tree.
Jackets, umbrellas and boots were piled near the entrance of the school.
The quarterly meeting was postponed until Friday because of the holiday.
Each player throws two dice and moves forward by the sum of the numbers.
A fisherman repairs his net on the pier while seagulls circle overhead.
The plate holds a sandwich, some fries and a small cup of ketchup.
Extra zeal for quality work often yields excellent, jaw-dropping results.
Joy and Max visited Quebec, Zurich and Oslo during their long vacation.
Question: how many people are in the picture? Answer: four.
The bus is yellow, the car is black, and the truck parked behind them is white.
Her email said: meet me at the cafe on 5th Avenue at half past seven.
Water boils at 100 degrees Celsius at sea level, but at lower temperatures higher up.
The giraffe stretched its long neck to reach the leaves at the top of the tree.
Wait -- did you remember to lock the door and turn off the lights?
Good morning! The weather today is sunny with a light breeze from the west.
Unzip the file, open the folder named data, and run the script twice.
A kid in a striped shirt flies a kite shaped like a dragon on the beach.
Version 2.1 fixed 17 bugs and added support for larger images [beta].
"""

# Syllable pieces for the deterministic pseudo-word generator.  Real English alone
# only yields a few thousand BPE merges; unique pseudo-words supply the rest so the
# trainer can always reach the requested vocabulary size exactly.
_ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y", "z", "br", "cr", "dr", "fr", "gr", "pr", "tr", "bl", "cl", "fl", "gl", "pl", "sl", "st", "sp", "sk", "sh", "ch", "th", "qu", "wh"]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "oa", "oo", "ou", "ie", "ay"]
_CODAS = ("", "", "", "n", "r", "s", "l", "t", "m", "nd", "st", "ck", "ng", "x", "ph")

# Llama reserves ids 0..2 for <unk>/<s>/</s> and 3..258 for the 256 byte pieces.
_META_PIECES = 3 + 256
# The smallest corpus tier keeps only lowercase letters (plus the word boundary
# piece), so the smallest trainable vocab is 259 + 26 + 1.
_BASIC_CHARS = 26 + 1
MIN_VOCAB_SIZE = _META_PIECES + _BASIC_CHARS  # 286
# Covers Llama/Vicuna/Mistral (32000), Yi (64000) and Llama-3-sized (128256) embedding
# tables.  Measured: 32000 builds in ~1 s, 262144 in ~10 s; the pseudo-word generator
# stays unique well past this.
MAX_VOCAB_SIZE = 262144


def _mix64(x: int) -> int:
    """SplitMix64 finaliser: a tiny, version-independent PRNG (random.Random's
    choice()/randrange() are not guaranteed stable across Python releases)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _pseudo_word(i: int) -> str:
    """The i-th pseudo-word: 2-4 syllables picked by hashing i."""
    h = _mix64(i)
    syllables = []
    for k in range(2 + h % 3):
        h = _mix64(h + k)
        syllables.append(_ONSETS[h % len(_ONSETS)] + _NUCLEI[(h >> 16) % len(_NUCLEI)]
                         + _CODAS[(h >> 32) % len(_CODAS)])
    return "".join(syllables)


def _pseudo_sentences(n_words: int, rich: bool) -> list[str]:
    """Group pseudo-words into 8-word sentences; the rich tier adds capitals, digits
    and punctuation so those patterns also get merges."""
    out = []
    for start in range(0, n_words, 8):
        words = [_pseudo_word(i) for i in range(start, min(start + 8, n_words))]
        if rich:
            words[0] = words[0].capitalize()
            words.insert(len(words) // 2, str(_mix64(start) % 10000))
            out.append(" ".join(words) + (".", "?", "!", ";")[start // 8 % 4])
        else:
            out.append(" ".join(words))
    return out


def _required_pieces(sentences: list[str]) -> int:
    """Vocab size below which sentencepiece refuses to train on `sentences`: the meta and
    byte pieces plus one piece per distinct character (" " becomes the "▁" piece)."""
    return _META_PIECES + len(set("".join(sentences)) | {" "})


def _corpus(vocab_size: int) -> list[str]:
    """Training sentences for `vocab_size`.  Every distinct character of the corpus
    must get its own piece, so vocabularies too small for the full corpus fall back to
    a lowercase-only one (other characters still encode through byte fallback)."""
    # Repeating the English text gives its words higher counts than the pseudo-words,
    # so real English merges come first (lowest ids), as in a real tokenizer.
    english = _ENGLISH_TEXT.splitlines()
    rich = english * 8 + _pseudo_sentences(vocab_size, rich=True)
    if _required_pieces(rich) <= vocab_size:
        return rich
    english = [re.sub(r"[^a-z ]+", " ", s.lower()).strip() for s in english]
    return english * 8 + _pseudo_sentences(vocab_size, rich=False)


def _train_sentencepiece(vocab_size: int) -> bytes:
    """Train the Llama-style BPE model in memory and return the serialized proto.
    Options mirror the trainer_spec/normalizer_spec stored in Llama-2's tokenizer.model."""
    import sentencepiece as spm  # heavy: sentencepiece

    # Only matters if sampling/shuffling kicks in; pinned anyway so builds never depend
    # on std::random_device.
    spm.set_random_generator_seed(0)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(vocab_size)), model_writer=buf,
        model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=True,
        character_coverage=1.0, byte_fallback=True, split_digits=True,
        split_by_unicode_script=True, split_by_whitespace=True, split_by_number=True,
        allow_whitespace_only_pieces=True, max_sentencepiece_length=16,
        normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        num_threads=1,  # multi-threaded counting may break score ties differently
        minloglevel=2,
    )
    return buf.getvalue()


def _bpe_merges(sp) -> list[tuple[str, str]]:
    """Merges for the `tokenizers` BPE model, equivalent to sentencepiece's BPE:
    spm merges the adjacent pair whose concatenation has the highest score, so every
    split of a piece into two in-vocab halves becomes a merge ranked by that score
    (the same rule transformers' SentencePieceExtractor uses)."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, pid in vocab.items():
        if sp.is_control(pid) or sp.is_byte(pid) or sp.is_unknown(pid):
            continue
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges += [(left, right, sp.get_score(pid)) for left, right in local]
    # Stable sort: highest score first, then shorter left/right halves first.
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _fast_tokenizer_json(model_proto: bytes) -> str:
    """tokenizer.json in the layout of the published Llama-2 / llava-v1.5 files
    (Prepend+Replace normalizer, no pre-tokenizer, BOS template), so it also behaves
    like sentencepiece when read by plain `tokenizers` or transformers 4.x."""
    import sentencepiece as spm  # heavy: sentencepiece
    # heavy: tokenizers
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE  # heavy: tokenizers

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = Tokenizer(BPE(vocab=vocab, merges=_bpe_merges(sp), unk_token="<unk>",
                        fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(content=" ", left=1, right=0)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in ("<unk>", "<s>", "</s>")])
    return tok.to_str(pretty=True)


def _special(content: str) -> dict:
    # Same AddedToken shape as the published Llama-2 / llava-v1.5 configs.
    return {"content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False}


def _tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json as published with llava-v1.5 (legacy=false, BOS only,
    right padding, no pad token).  transformers 5 ignores the tokenizer.json pipeline
    for LlamaTokenizer and builds Metaspace(prepend_scheme="first") from `legacy`; that
    matches sentencepiece except on text that starts with a space, where no legacy
    value helps (Metaspace never prepends "▁" to text already starting with one)."""
    added = {str(i): {**_special(t), "special": True}
             for i, t in enumerate(("<unk>", "<s>", "</s>"))}
    return {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added,
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>",
        "legacy": False, "model_max_length": model_max_length, "pad_token": None,
        "padding_side": "right", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
    }


def _write_json(path: Path, obj) -> None:
    # Sorted keys + fixed indent: byte-identical files on every build.
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")


def build_tokenizer(out_dir: Path, vocab_size: int, model_max_length: int = 2048) -> None:
    """Write tokenizer.model, tokenizer.json, tokenizer_config.json and
    special_tokens_map.json for a Llama-style tokenizer with exactly `vocab_size` ids.

    Raises ValueError if vocab_size is outside [MIN_VOCAB_SIZE, MAX_VOCAB_SIZE]."""
    if isinstance(vocab_size, bool) or int(vocab_size) != vocab_size or \
            not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size!r} is outside the supported range "
                         f"[{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}]")
    vocab_size = int(vocab_size)  # accept numpy / torch integers from configs
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    proto = _train_sentencepiece(vocab_size)
    (out_dir / "tokenizer.model").write_bytes(proto)
    (out_dir / "tokenizer.json").write_text(_fast_tokenizer_json(proto) + "\n", encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(model_max_length))
    _write_json(out_dir / "special_tokens_map.json",
                {k: _special(v) for k, v in
                 (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))})


# ---------------------------------------------------------------------------
# CLIP vision tower
# ---------------------------------------------------------------------------

# Values from openai/clip-vit-large-patch14-336's preprocessor_config.json.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def _preprocessor_config(image_size: int) -> dict:
    """CLIPImageProcessor settings of openai/clip-vit-large-patch14-336, scaled to
    image_size (explicit size dicts, which every transformers version reads)."""
    return {
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
        "do_rescale": True, "do_resize": True,
        "image_mean": _CLIP_MEAN, "image_processor_type": "CLIPImageProcessor",
        "image_std": _CLIP_STD, "resample": 3, "rescale_factor": 1 / 255,
        "size": {"shortest_edge": image_size},
    }


def build_clip_tower(out_dir: Path, *, hidden_size: int, num_hidden_layers: int,
                     num_attention_heads: int, intermediate_size: int, image_size: int,
                     patch_size: int, projection_dim: int | None = None, seed: int = 0,
                     dtype: torch.dtype = torch.float16) -> None:
    """Write config.json, model.safetensors and preprocessor_config.json for a randomly
    initialised CLIPVisionModel, loadable offline the way LLaVA's CLIPVisionTower loads
    `mm_vision_tower` (CLIPVisionModel / CLIPVisionConfig / CLIPImageProcessor)."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype={dtype} not supported; use one of {list(_DTYPE_NAMES)}")
    vision = VisionSpec(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                        num_attention_heads=num_attention_heads,
                        intermediate_size=intermediate_size, image_size=image_size,
                        patch_size=patch_size, projection_dim=projection_dim or 768)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "config.json", clip_tower_config(vision, _DTYPE_NAMES[dtype]))
    # The same deterministic fill and streaming writer as the checkpoint shards: one tensor
    # window at a time, values a function of (seed, key) only.
    write_safetensors(out_dir / "model.safetensors",
                      save_file_order(clip_tensors(vision, _DTYPE_NAMES[dtype])),
                      lambda info: tensor_chunks(seed, info, None))
    _write_json(out_dir / "preprocessor_config.json", _preprocessor_config(image_size))
