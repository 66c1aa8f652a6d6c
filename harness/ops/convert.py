"""Layout conversion: original LLaVA <-> llava-hf (transformers' LlavaForConditionalGeneration,
and LlavaNextForConditionalGeneration for LLaVA-1.6 anyres checkpoints).

Keys go through the declarative maps in harness/llava/keys.py (layout -> canonical -> layout), shards
are rewritten streaming by the checkpoint layer (harness/checkpoint/shards.py), so no shard is held in memory.

What differs beyond names, and how it is bridged:
- The vision tower. The original reads it from the folder `mm_vision_tower` names; llava-hf
  stores it in the checkpoint (`vision_tower.vision_model.*`). To hf: the tower folder's tensors
  are appended to the last shard. To original: they become `<out>/vision_tower/` (config,
  safetensors, CLIP image processor) and `mm_vision_tower` names that folder's absolute path.
- The image token. The original marks an image with id -200 and splices the features in,
  lengthening the sequence; llava-hf repeats a real token (`<image>`) once per image feature
  and overwrites those embeddings. So to hf, `<image>` (id = the old vocab size) and `<pad>`
  are added to the tokenizer and the embedding and lm_head rows grow to a multiple of 64, as
  llava-hf's own conversion does; the new rows are the mean of the existing rows (the centre
  of llava-hf's random draw, so the result is deterministic). To original, rows from the image
  token's id on are cut off and the two tokens removed again: original -> hf -> original is
  byte-exact per tensor (the legacy inv_freq buffers, which llava-hf does not hold, excepted).
- LLaVA-1.6 (anyres). llava-hf writes the grid pinpoints as [height, width], the original as
  [width, height]: each pair is swapped both ways, in order. (Copying the list unswapped, as
  the published llava-hf v1.6 processors list it, gives the same set of pinpoints but another
  winner where two tie: an image smaller than one crop, e.g. 300x200 at 336 px, then gets a
  2x1 grid where the original uses 1x2.) The original runs the tuned tower
  stored in the checkpoint when `unfreeze_mm_vision_tower` is set: that tower is the one
  converted. Back to the original, the tower is stored in the checkpoint again (and written as
  the tower folder, for its config and processor), as LLaVA-1.6 publishes it.
- Only what llava-hf can express converts: an mlp2x_gelu projector (GELU, with biases), a single
  feature layer, 'patch' / 'cls_patch' features, no image start-end tokens, and either
  pad/square images with the flat merge (LlavaForConditionalGeneration) or anyres with
  spatial_unpad (LlavaNextForConditionalGeneration, which has no other merge). Anything else is
  refused with the config field named.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from ..checkpoint.atomic import atomic_dir
from ..checkpoint.files import copy_files
from ..checkpoint.formats import DTYPE_BYTES
from ..checkpoint.identity import STAMPED_FIELDS
from ..checkpoint.paths import check_output, inside
from ..checkpoint.reader import ScannedFolder, read_json, scan_folder
from ..checkpoint.safetensors_format import safetensors_order, write_safetensors
from ..checkpoint.shards import plan_shards, write_shards
from ..checkpoint.tensors import Piece, Source, piece_chunks
from ..errors import HarnessError
from ..llava import keys
from ..llava.config import is_llava_field, read_tower_config, rope_4x
from ..model.config import read_config_json
from .strip import arch_of

IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
# llava-hf pads the token rows to a multiple of 64 (tensor-core friendly shapes).
VOCAB_MULTIPLE = 64
TOWER_DIR = "vision_tower"
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
# Fields of a config.json that say who wrote it rather than what the model is: what every save
# stamps, and the class and dtype the other layout names its own way.
_IDENTITY_FIELDS = STAMPED_FIELDS | {"architectures", "model_type", "torch_dtype", "dtype"}
# The multimodal fields of a published llava-v1.5 config that llava-hf has no place for: on the
# way back they take the values every v1.5 release has.
ORIGINAL_DEFAULTS = {
    "freeze_mm_mlp_adapter": False, "image_grid_pinpoints": None, "mm_patch_merge_type": "flat",
    "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu", "mm_resampler_type": None,
    "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
    "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": False,
    "tune_mm_vision_resampler": False, "unfreeze_mm_vision_tower": False, "use_mm_proj": True,
}
# openai/clip-vit-large-patch14-336's normalisation, for a tower folder with no processor file.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class ConvertError(HarnessError):
    """A checkpoint the target layout cannot express, or a tower/tokenizer that does not fit."""


@dataclass
class ConvertResult:
    out: Path
    to: str
    format: str
    tensors: int
    vocab: tuple[int, int]
    dropped: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    """A JSON file of a checkpoint folder, resolved inside it (a link out is refused)."""
    if path.name == "config.json":
        return read_config_json(path.parent)
    return read_json(inside(path.parent, path.name), path)


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def convert(ckpt: Path, out: Path, to: str, *, vision_tower: Path | None = None,
            to_format: str | None = None, force: bool = False) -> ConvertResult:
    """Convert the checkpoint at `ckpt` to the `to` layout ('hf' or 'original') at `out`."""
    if to not in ("hf", "original"):
        raise ConvertError(f"--to {to!r}: expected hf or original")
    check_output(Path(out), [Path(ckpt)] + ([Path(vision_tower)] if vision_tower else []))
    scanned = scan_folder(Path(ckpt))
    config = _read_json(scanned.folder.path / "config.json")
    layout = keys.layout_of(config, scanned.tensors, where=str(scanned.folder.path))
    if layout == to:
        raise ConvertError(f"{scanned.folder.path}: already in the "
                           f"{'llava-hf' if to == 'hf' else 'original LLaVA'} layout")
    fmt = to_format or scanned.folder.format
    if to == "hf":
        return _to_hf(scanned, config, Path(out), vision_tower, fmt, force)
    return _to_original(scanned, config, Path(out), fmt, force)


# --- rows of the token matrices --------------------------------------------------------------


def padded_vocab(vocab: int) -> int:
    """Rows after adding <image> and <pad>, rounded up to VOCAB_MULTIPLE."""
    return math.ceil((vocab + 2) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def mean_row(source: Source, where: Path) -> bytes:
    """The mean of a [rows, hidden] tensor's rows in its own dtype, summed in float64 over
    chunks read from disk (never the whole matrix in memory)."""
    import torch  # heavy: torch

    rows, hidden = source.shape
    dtype = getattr(torch, source.dtype)
    row_bytes = hidden * DTYPE_BYTES[source.dtype]
    total, carry = torch.zeros(hidden, dtype=torch.float64), b""
    for piece in source.byte_pieces(where):
        for chunk in piece_chunks(piece):
            data = carry + chunk
            usable = len(data) - len(data) % row_bytes
            if usable:
                block = torch.frombuffer(bytearray(data[:usable]), dtype=dtype)
                total += block.view(-1, hidden).to(torch.float64).sum(0)
            carry = data[usable:]
    mean = (total / rows).to(dtype)
    return mean.view(torch.uint8).numpy().tobytes()


def pad_rows(source: Source, key: str, rows: int, where: Path) -> Source:
    have, hidden = source.shape
    if have == rows:
        return source.renamed(key)
    extra = mean_row(source, where) * (rows - have)
    return Source(key, source.dtype, (rows, hidden),
                  (*source.byte_pieces(where), Piece(None, 0, len(extra), extra)))


def cut_rows(source: Source, key: str, rows: int, where: Path) -> Source:
    have, hidden = source.shape
    if have == rows:
        return source.renamed(key)
    if rows > have:
        raise ConvertError(f"{where}: {source.key} has {have} rows, fewer than the "
                           f"{rows} the image token's id implies")
    (piece,) = source.byte_pieces(where)
    nbytes = rows * hidden * DTYPE_BYTES[source.dtype]
    return Source(key, source.dtype, (rows, hidden), (Piece(piece.path, piece.offset, nbytes),))


# --- LLaVA-1.6 (anyres) ------------------------------------------------------------------------


def is_next(config: dict) -> bool:
    """An original LLaVA-1.6 config (anyres images)."""
    return config.get("image_aspect_ratio") == "anyres"


def is_hf_next(config: dict) -> bool:
    return config.get("model_type") == "llava_next" or "image_grid_pinpoints" in config


def swap_pinpoints(pinpoints) -> list[list[int]]:
    """[a, b] -> [b, a] for every pair: the original's [width, height] <-> llava-hf's
    [height, width], in the same order (the order decides ties)."""
    return [[b, a] for a, b in pinpoints]


# --- original -> hf ----------------------------------------------------------------------------


def _refuse(where: Path, name: str, value, why: str, target: str) -> None:
    raise ConvertError(f"{where}: {name}={value!r}: {why}; transformers' {target} cannot "
                       "express it")


def check_original_supported(config: dict, where: Path) -> None:
    target = "LlavaNextForConditionalGeneration" if is_next(config) \
        else "LlavaForConditionalGeneration"
    projector = config.get("mm_projector_type") or "linear"
    if projector != "mlp2x_gelu":
        _refuse(where, "mm_projector_type", projector, "llava-hf has exactly one projector, "
                "Linear-GELU-Linear with biases (mlp2x_gelu)", target)
    if is_next(config):
        from ..model.anyres import AnyresError, pinpoints_of  # heavy: torch

        try:
            pinpoints_of(SimpleNamespace(**config))
        except AnyresError as exc:
            raise ConvertError(f"{where}: {exc}") from None
        images = (("mm_patch_merge_type", ("spatial_unpad",)),)
    else:
        images = (("mm_patch_merge_type", ("flat", None)),
                  ("image_aspect_ratio", ("pad", "square", None)))
    for name, allowed in (*images,
                          ("mm_use_im_start_end", (False, None)),
                          ("mm_use_im_patch_token", (False, None)),
                          ("mm_resampler_type", (None,)),
                          ("mm_vision_select_feature", ("patch", "cls_patch", None))):
        if config.get(name) not in allowed:
            _refuse(where, name, config.get(name), f"supported: {allowed}", target)
    if not isinstance(config.get("mm_vision_select_layer", -2), int):
        _refuse(where, "mm_vision_select_layer", config.get("mm_vision_select_layer"),
                "expected one layer index", target)


def tower_folder(named, where: Path) -> Path:
    if not named:
        raise ConvertError(f"{where}: no mm_vision_tower; pass --vision-tower DIR")
    path = Path(named)
    if not (path / "config.json").is_file():
        raise ConvertError(f"{where}: mm_vision_tower {str(named)!r} is not a local CLIP folder "
                           "(the harness never downloads); pass --vision-tower DIR")
    return path


def vision_config_of(tower: Path) -> dict:
    data = read_tower_config(tower)
    vision = data.get("vision_config", data) if data.get("model_type") == "clip" else data
    vision = {k: v for k, v in vision.items() if k not in _IDENTITY_FIELDS}
    return {**vision, "model_type": "clip_vision_model"}


def hf_config(config: dict, arch: str, vision: dict, vocab: int) -> dict:
    text = {k: v for k, v in config.items()
            if not is_llava_field(k) and k not in _IDENTITY_FIELDS}
    text.update(model_type=arch, vocab_size=padded_vocab(vocab))
    feature = config.get("mm_vision_select_feature") or "patch"
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    out = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "text_config": text, "vision_config": vision,
        "image_token_index": vocab, "pad_token_id": vocab + 1,
        "image_seq_length": patches + (feature == "cls_patch"),
        "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "vision_feature_layer": config.get("mm_vision_select_layer", -2),
        "vision_feature_select_strategy": "default" if feature == "patch" else "full",
        "tie_word_embeddings": False,
    }
    if is_next(config):
        out.update(architectures=["LlavaNextForConditionalGeneration"], model_type="llava_next",
                   image_grid_pinpoints=swap_pinpoints(config["image_grid_pinpoints"]),
                   use_image_newline_parameter=True)
    if config.get("torch_dtype"):
        out["torch_dtype"] = config["torch_dtype"]
    return out


def check_stored_tower(scanned: ScannedFolder, tower: Path) -> None:
    """The stored tower must be the whole tower its folder describes, tensor for tensor."""
    stored = {}
    for key, source in scanned.tensors.items():
        canonical = keys.ORIGINAL(key, where=str(scanned.folder.path))
        if canonical.startswith(keys.VISION_TOWER_PREFIX):
            stored[canonical] = source
    expected = {}
    for key, source in scan_folder(tower).tensors.items():
        canonical = keys.TOWER_FOLDER(key, where=str(tower))
        if canonical is not None:
            expected[canonical] = source
    for key in sorted(expected.keys() | stored.keys()):
        if key not in stored or key not in expected:
            where, what = ((scanned.folder.path, "lacks") if key not in stored
                           else (tower, "has no counterpart of"))
            raise ConvertError(f"{where}: the stored vision tower {what} {key} "
                               f"(unfreeze_mm_vision_tower; the tower folder is {tower})")
        if tuple(stored[key].shape) != tuple(expected[key].shape):
            raise ConvertError(f"{scanned.folder.path}: stored tower tensor {key} has shape "
                               f"{stored[key].shape}, the tower folder's {expected[key].shape}")


def _hf_mapper(folder: Path, vocab: int, dropped: list[str], stored_tower: bool):
    rows = padded_vocab(vocab)

    def mapper(file: str, source: Source) -> Source | None:
        where = folder / file
        canonical = keys.ORIGINAL(source.key, where=str(where))
        # Unless it builds the tower at init (stored_tower), the original re-reads the tower
        # from mm_vision_tower and ignores a stored copy.
        tower = canonical.startswith(keys.VISION_TOWER_PREFIX)
        if keys.is_legacy_buffer(canonical) or (tower and not stored_tower):
            dropped.append(source.key)
            return None
        target = keys.TO_HF(canonical, where=str(where))
        if canonical in (EMBED, LM_HEAD):
            if source.shape[0] != vocab:
                raise ConvertError(f"{where}: {source.key} has {source.shape[0]} rows, "
                                   f"config.json says vocab_size {vocab}")
            return pad_rows(source, target, rows, where)
        return source.renamed(target)

    return mapper


def _to_hf(scanned: ScannedFolder, config: dict, out: Path, vision_tower, fmt: str,
           force: bool) -> ConvertResult:
    folder = scanned.folder.path
    where = folder / "config.json"
    arch = arch_of(config, "original", where)
    check_original_supported(config, where)
    tower = tower_folder(vision_tower or config.get("mm_vision_tower"), where)
    vision = vision_config_of(tower)
    vocab = config["vocab_size"]
    dropped: list[str] = []
    stored_tower = keys.runs_stored_tower(config, scanned.tensors)
    if stored_tower:
        check_stored_tower(scanned, tower)
    shards = plan_shards(scanned, _hf_mapper(folder, vocab, dropped, stored_tower), fmt)
    if not stored_tower:
        shards[-1].tensors.extend(_tower_into_checkpoint(tower))
        shards[-1].link_from = None
    with atomic_dir(out, force) as tmp:
        write_shards(tmp, shards, fmt, indexed=scanned.folder.index_file is not None)
        _dump(tmp / "config.json", hf_config(config, arch, vision, vocab))
        add_image_tokens(folder, tmp, vocab)
        write_hf_processor(tower, tmp, config, vision)
        _copy_if_present(folder, tmp, "generation_config.json")
    return ConvertResult(out, "hf", fmt, sum(len(s.tensors) for s in shards),
                         (vocab, padded_vocab(vocab)), sorted(dropped))


def _tower_into_checkpoint(tower: Path) -> list[Source]:
    out = []
    for key, source in scan_folder(tower).tensors.items():
        canonical = keys.TOWER_FOLDER(key, where=str(tower))
        if canonical is not None:
            out.append(source.renamed(keys.TO_HF(canonical)))
    return out


def _processor_base(tower: Path, vision: dict) -> dict:
    path = tower / "preprocessor_config.json"
    return _read_json(path) if path.is_file() else clip_processor_defaults(vision["image_size"])


def clip_processor_defaults(size: int) -> dict:
    """openai/clip-vit-large-patch14-336's CLIPImageProcessor settings at `size` pixels."""
    return {"crop_size": {"height": size, "width": size}, "do_center_crop": True,
            "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3,
            "rescale_factor": 1 / 255, "size": {"shortest_edge": size}}


def write_hf_processor(tower: Path, out: Path, config: dict, vision: dict) -> None:
    """LlavaProcessor's files: the tower's CLIP settings with LLaVA's pad-to-square ('pad'
    squares with the mean colour first, as the original's expand2square); for LLaVA-1.6,
    LlavaNextProcessor's with the grid pinpoints in llava-hf's [height, width]."""
    image = _processor_base(tower, vision)
    processor = "LlavaNextProcessor" if is_next(config) else "LlavaProcessor"
    if is_next(config):
        image.update(image_processor_type="LlavaNextImageProcessor", processor_class=processor,
                     do_pad=True,
                     image_grid_pinpoints=swap_pinpoints(config["image_grid_pinpoints"]))
    else:
        image.update(image_processor_type="LlavaImageProcessor", processor_class=processor,
                     do_pad=config.get("image_aspect_ratio") == "pad")
    _dump(out / "preprocessor_config.json", image)
    feature = config.get("mm_vision_select_feature") or "patch"
    _dump(out / "processor_config.json", {
        "processor_class": processor, "image_token": IMAGE_TOKEN,
        "patch_size": vision["patch_size"], "num_additional_image_tokens": 1,
        "vision_feature_select_strategy": "default" if feature == "patch" else "full"})


# --- tokenizer files ------------------------------------------------------------------------------


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def add_image_tokens(src: Path, out: Path, vocab: int) -> None:
    """Copy the tokenizer files with <image> (id `vocab`) and <pad> (id `vocab` + 1) added."""
    new = {vocab: IMAGE_TOKEN, vocab + 1: PAD_TOKEN}
    _copy_if_present(src, out, "tokenizer.model")
    path = src / "tokenizer.json"
    if path.is_file():
        data = _read_json(path)
        taken = {t["id"]: t["content"] for t in data.get("added_tokens", [])}
        clash = {i: t for i, t in taken.items() if i in new or t in new.values()}
        if clash:
            raise ConvertError(f"{path}: already holds {clash}; cannot add {new}")
        data["added_tokens"] = data.get("added_tokens", []) + [
            {"id": i, **_special(t), "special": True} for i, t in new.items()]
        _dump(out / "tokenizer.json", data)
    path = src / "tokenizer_config.json"
    if path.is_file():
        data = _read_json(path)
        decoder = data.setdefault("added_tokens_decoder", {})
        decoder.update({str(i): {**_special(t), "special": True} for i, t in new.items()})
        data["pad_token"] = PAD_TOKEN
        _dump(out / "tokenizer_config.json", data)
    path = src / "special_tokens_map.json"
    if path.is_file():
        _dump(out / "special_tokens_map.json", {**_read_json(path), "pad_token":
                                                _special(PAD_TOKEN)})
    path = src / "added_tokens.json"
    if path.is_file():
        _dump(out / "added_tokens.json", {**_read_json(path), **{t: i for i, t in new.items()}})


def remove_image_tokens(src: Path, out: Path, vocab: int) -> None:
    """Copy the tokenizer files without the tokens whose ids are >= `vocab` (those the hf
    conversion added: only <image> and <pad> may be there, or a row would be lost)."""
    _copy_if_present(src, out, "tokenizer.model")
    removed = _tokens_from(src, vocab)
    odd = sorted(set(removed.values()) - {IMAGE_TOKEN, PAD_TOKEN})
    if odd:
        raise ConvertError(f"{src}: tokens {odd} have ids >= {vocab} (the image token's id); "
                           "cutting the rows there would lose them")
    path = src / "tokenizer.json"
    if path.is_file():
        data = _read_json(path)
        data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < vocab]
        _dump(out / "tokenizer.json", data)
    path = src / "tokenizer_config.json"
    if path.is_file():
        data = _read_json(path)
        data["added_tokens_decoder"] = {i: t for i, t in
                                        data.get("added_tokens_decoder", {}).items()
                                        if int(i) < vocab}
        names = set(removed.values())
        if _content(data.get("pad_token")) in names:
            data["pad_token"] = None
        if _content(data.get("image_token")) in names:
            del data["image_token"]
        if isinstance(data.get("extra_special_tokens"), dict):
            data["extra_special_tokens"] = {k: v for k, v in data["extra_special_tokens"].items()
                                            if _content(v) not in names}
        data.pop("processor_class", None)
        _dump(out / "tokenizer_config.json", data)
    path = src / "special_tokens_map.json"
    if path.is_file():
        data = {k: v for k, v in _read_json(path).items()
                if _content(v) not in removed.values()}
        _dump(out / "special_tokens_map.json", data)
    path = src / "added_tokens.json"
    if path.is_file():
        data = {t: i for t, i in _read_json(path).items() if i < vocab}
        if data:
            _dump(out / "added_tokens.json", data)


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _tokens_from(src: Path, vocab: int) -> dict[int, str]:
    found = {}
    if inside(src, "tokenizer.json", must_exist=False):
        found.update({t["id"]: t["content"] for t in
                      _read_json(src / "tokenizer.json").get("added_tokens", [])})
    if inside(src, "tokenizer_config.json", must_exist=False):
        decoder = _read_json(src / "tokenizer_config.json").get("added_tokens_decoder", {})
        found.update({int(i): t["content"] for i, t in decoder.items()})
    return {i: t for i, t in found.items() if i >= vocab}


def _copy_if_present(src: Path, out: Path, name: str) -> None:
    copy_files(src, out, [name])


# --- hf -> original -------------------------------------------------------------------------------


def check_hf_supported(config: dict, where: Path) -> None:
    for name, allowed in (("projector_hidden_act", ("gelu",)),
                          ("multimodal_projector_bias", (True, None)),
                          ("vision_feature_select_strategy", ("default", "full"))):
        if config.get(name, allowed[0]) not in allowed:
            raise ConvertError(f"{where}: {name}={config.get(name)!r}: the original LLaVA "
                               f"has no equivalent (supported: {allowed})")
    if not isinstance(config.get("vision_feature_layer", -2), int):
        raise ConvertError(f"{where}: vision_feature_layer={config['vision_feature_layer']!r}: "
                           "the original LLaVA selects one layer")
    if "image_token_index" not in config:
        raise ConvertError(f"{where}: no image_token_index")


def original_config(config: dict, arch: str, tower_path: str, aspect: str,
                    max_length: int) -> dict:
    # transformers 5 spells rope as rope_parameters; LLaVA reads the 4.x fields
    text = rope_4x({k: v for k, v in config["text_config"].items() if k not in _IDENTITY_FIELDS})
    vision = config["vision_config"]
    strategy = config.get("vision_feature_select_strategy", "default")
    mistral = arch == "mistral"
    out = {**text, **ORIGINAL_DEFAULTS,
           "architectures": ["LlavaMistralForCausalLM" if mistral else "LlavaLlamaForCausalLM"],
           "model_type": "llava_mistral" if mistral else "llava",
           "vocab_size": config["image_token_index"],
           "image_aspect_ratio": aspect,
           "mm_hidden_size": vision["hidden_size"],
           "mm_vision_tower": tower_path,
           "mm_vision_select_layer": config.get("vision_feature_layer", -2),
           "mm_vision_select_feature": "patch" if strategy == "default" else "cls_patch",
           "tokenizer_model_max_length": max_length}
    if is_hf_next(config):
        # LLaVA-1.6 as published: anyres, spatial_unpad, the tuned tower in the checkpoint.
        out.update(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                   image_grid_pinpoints=swap_pinpoints(config["image_grid_pinpoints"]),
                   unfreeze_mm_vision_tower=True)
    dtype = config.get("torch_dtype") or config.get("dtype") or config["text_config"].get(
        "torch_dtype") or config["text_config"].get("dtype")
    if dtype:
        out["torch_dtype"] = dtype
    return out


def _original_mapper(folder: Path, vocab: int, tower: list[Source], dropped: list[str],
                     store_tower: bool):
    def mapper(file: str, source: Source) -> Source | None:
        where = folder / file
        canonical = keys.HF_READ(source.key, where=str(where))
        if keys.is_legacy_buffer(canonical):
            dropped.append(source.key)
            return None
        if canonical.startswith(keys.VISION_TOWER_PREFIX):
            tower.append(source.renamed(keys.TO_TOWER_FOLDER(canonical, where=str(where))))
            return source.renamed(canonical) if store_tower else None
        if canonical in (EMBED, LM_HEAD):
            return cut_rows(source, canonical, vocab, where)
        return source if canonical == source.key else source.renamed(canonical)

    return mapper


def _to_original(scanned: ScannedFolder, config: dict, out: Path, fmt: str,
                 force: bool) -> ConvertResult:
    folder = scanned.folder.path
    where = folder / "config.json"
    check_hf_supported(config, where)
    arch = arch_of(config, "hf", where)
    vocab = config["image_token_index"]
    tower: list[Source] = []
    dropped: list[str] = []
    shards = plan_shards(scanned, _original_mapper(folder, vocab, tower, dropped,
                                                   store_tower=is_hf_next(config)), fmt)
    if not tower:
        raise ConvertError(f"{folder}: holds no vision tower tensors (vision_tower.*)")
    image = _read_json(folder / "preprocessor_config.json") \
        if (folder / "preprocessor_config.json").is_file() else {}
    aspect = "pad" if image.get("do_pad") else "square"
    tok = folder / "tokenizer_config.json"
    max_length = _read_json(tok).get("model_max_length", 2048) if tok.is_file() else 2048
    tower_path = str(Path(out).absolute() / TOWER_DIR)
    with atomic_dir(out, force) as tmp:
        write_shards(tmp, shards, fmt, indexed=scanned.folder.index_file is not None)
        write_tower_folder(tmp / TOWER_DIR, tower, config["vision_config"], image)
        _dump(tmp / "config.json", original_config(config, arch, tower_path, aspect,
                                                   max_length))
        remove_image_tokens(folder, tmp, vocab)
        _copy_if_present(folder, tmp, "generation_config.json")
    return ConvertResult(out, "original", fmt, sum(len(s.tensors) for s in shards),
                         (config["text_config"]["vocab_size"], vocab), sorted(dropped))


def write_tower_folder(path: Path, tensors: list[Source], vision: dict, image: dict) -> None:
    """A CLIP tower folder as LLaVA's CLIPVisionTower loads it: config, weights, processor."""
    path.mkdir()
    dtypes = {t.dtype for t in tensors}
    config = {k: v for k, v in vision.items() if k not in _IDENTITY_FIELDS}
    config.update(architectures=["CLIPVisionModel"], model_type="clip_vision_model")
    if len(dtypes) == 1:
        config["torch_dtype"] = dtypes.pop()
    _dump(path / "config.json", config)
    write_safetensors(path / "model.safetensors", safetensors_order(tensors))
    processor = dict(image) or clip_processor_defaults(vision["image_size"])
    for name in ("do_pad", "processor_class", "image_grid_pinpoints"):
        processor.pop(name, None)
    processor["image_processor_type"] = "CLIPImageProcessor"
    _dump(path / "preprocessor_config.json", processor)

