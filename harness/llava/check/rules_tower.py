"""Rules about the vision side: the tower config.json names, the tower stored in the checkpoint,
LLaVA-1.6's anyres grid and image_newline, and how many tokens an image becomes."""

from __future__ import annotations

import re
from pathlib import Path

from ...checkpoint.reader import read_json
from ..config import CONFIG, tower_problems
from ..fields import parse_pinpoints
from ..keys import IMAGE_NEWLINE, STORED_TOWER
from .context import Context
from .model import NotApplicable, rule

# LLaVA's build_vision_tower: a path that exists, or a hub name it knows how to build.
_BUILDABLE = re.compile(r"^(openai|laion)|ShareGPT4V")
_CLIP_TYPES = ("clip", "clip_vision_model")


def _named_tower(ctx: Context) -> str:
    named = ctx.config.get("mm_vision_tower")
    if not named:
        raise NotApplicable("config.json names no vision tower")
    return named


@rule("tower-unresolvable", "error", ("llava", "lora", "projector"),
      "mm_vision_tower is neither an existing folder nor a tower LLaVA's builder can build",
      "LLaVA's build_vision_tower raises 'Unknown vision tower'",
      "point mm_vision_tower at the tower folder (or its hub id, e.g. "
      "openai/clip-vit-large-patch14-336)", "haotian-liu/LLaVA#348")
def tower_unresolvable(ctx: Context):
    named = _named_tower(ctx)
    path = Path(named) if Path(named).is_absolute() else ctx.path / named
    if not path.exists() and not _BUILDABLE.search(named):
        yield ctx.file(CONFIG), "mm_vision_tower", (f"{named!r} is no folder here and no tower "
                                                    "LLaVA's builder knows")


@rule("tower-not-local", "info", ("llava", "lora", "projector"),
      "mm_vision_tower names a hub tower: the checks that need its config are skipped",
      "LLaVA downloads it at load time", "to check it too, point mm_vision_tower at a local "
      "copy (or pass the folder with --vision-tower where a command takes one)",
      "haotian-liu/LLaVA#348")
def tower_not_local(ctx: Context):
    named = _named_tower(ctx)
    if ctx.tower_path is None and _BUILDABLE.search(named):
        yield ctx.file(CONFIG), "mm_vision_tower", f"{named!r} is a hub id, not a local folder"


@rule("tower-config", "error", ("llava", "lora", "projector"),
      "the local tower folder's config.json is malformed", "CLIPVisionModel fails to build",
      "restore the tower's config.json", "haotian-liu/LLaVA#1856")
def tower_config(ctx: Context):
    _named_tower(ctx)
    if ctx.tower_path is None:
        raise NotApplicable("mm_vision_tower is not a local folder")
    where = ctx.tower_path / CONFIG
    for problem in tower_problems(read_json(where), str(where)):
        yield str(where), "", problem.split(": ", 1)[1]


@rule("tower-kind", "error", ("llava", "lora", "projector"),
      "the tower folder holds another encoder than CLIP (SigLIP, ...)",
      "LLaVA's CLIPVisionTower loads it as CLIP: 'You are using a model of type siglip to "
      "instantiate a model of type clip_vision_model', then size mismatches",
      "use a LLaVA that builds this encoder, or the CLIP tower the model was trained with",
      "LLaVA-VL/LLaVA-NeXT#303, LLaVA-VL/LLaVA-NeXT#355")
def tower_kind(ctx: Context):
    model_type = ctx.tower_config.get("model_type")
    if model_type is not None and model_type not in _CLIP_TYPES:
        yield str(ctx.tower_path / CONFIG), "model_type", f"{model_type!r} is not a CLIP tower"


@rule("tower-dims", "error", ("llava", "lora", "projector"),
      "mm_hidden_size or mm_vision_select_layer does not fit the tower",
      "'size mismatch for model.mm_projector.0.weight', or an IndexError picking the layer",
      "set mm_hidden_size to the tower's hidden_size and the select layer within its layers",
      "haotian-liu/LLaVA#1161")
def tower_dims(ctx: Context):
    tower = ctx.tower_config
    width, layers = tower.get("hidden_size"), tower.get("num_hidden_layers")
    where = str((ctx.tower_path or ctx.path) / CONFIG)
    m = ctx.config.get("mm_hidden_size")
    if width is not None and m is not None and m != width:
        yield ctx.file(CONFIG), "mm_hidden_size", f"{m}, but the tower ({where}) is {width} wide"
    layer = ctx.config.get("mm_vision_select_layer")
    if layers is not None and layer is not None and not -(layers + 1) <= layer <= layers:
        yield ctx.file(CONFIG), "mm_vision_select_layer", (
            f"{layer}, but the tower has {layers} layers ({layers + 1} hidden states)")


def _stored_tower(ctx: Context) -> dict[str, tuple[int, ...]]:
    stored = {k[len(STORED_TOWER):]: v for k, v in ctx.canonical.items()
              if k.startswith(STORED_TOWER)}
    if not stored:
        raise NotApplicable("no vision tower is stored in the checkpoint")
    return stored


@rule("stored-tower-mismatch", "error", ("llava",),
      "the vision tower stored in the checkpoint is another encoder than the one "
      "mm_vision_tower and mm_hidden_size describe",
      "with unfreeze_mm_vision_tower the stored tensors load over the named tower: size "
      "mismatches, or features the projector was not trained on",
      "store the tower the model was trained with, or drop the stored tower",
      "LLaVA-VL/LLaVA-NeXT#309")
def stored_tower_mismatch(ctx: Context):
    stored = _stored_tower(ctx)
    patch = stored.get("embeddings.patch_embedding.weight")
    if patch is None or "embeddings.class_embedding" not in stored:
        yield str(ctx.path), STORED_TOWER + "embeddings", (
            "not a CLIP tower's embeddings (patch_embedding and class_embedding expected)")
        return
    width, size = patch[0], patch[-1]
    m = ctx.config.get("mm_hidden_size")
    if m is not None and width != m:
        yield str(ctx.path), STORED_TOWER + "embeddings.patch_embedding.weight", (
            f"{width} wide, but mm_hidden_size is {m}")
    try:
        tower = ctx.tower_config
    except NotApplicable:
        return
    if (tower.get("hidden_size"), tower.get("patch_size")) not in ((width, size), (None, None)):
        yield str(ctx.path), STORED_TOWER + "embeddings.patch_embedding.weight", (
            f"hidden {width}, patch {size}; the named tower is hidden "
            f"{tower.get('hidden_size')}, patch {tower.get('patch_size')}")


@rule("stored-tower-ignored", "warning", ("llava",),
      "a tuned vision tower is stored, but unfreeze_mm_vision_tower is false",
      "the stored tensors are 'not used': the original loads the named tower instead",
      "set unfreeze_mm_vision_tower: true if the tower was tuned, else drop the stored tower",
      "haotian-liu/LLaVA#1694")
def stored_tower_ignored(ctx: Context):
    _stored_tower(ctx)
    if not ctx.config.get("unfreeze_mm_vision_tower"):
        yield ctx.file(CONFIG), "unfreeze_mm_vision_tower", (
            "false or absent, but the checkpoint stores a vision tower")


@rule("stored-tower-absent", "error", ("llava",),
      "unfreeze_mm_vision_tower is true but no vision tower is stored",
      "the original builds the tower inside from_pretrained and finds no weights for it: "
      "'newly initialized', random features", "store the tuned tower, or set "
      "unfreeze_mm_vision_tower: false", "LLaVA-VL/LLaVA-NeXT#345")
def stored_tower_absent(ctx: Context):
    if ctx.config.get("unfreeze_mm_vision_tower") and not any(
            k.startswith(STORED_TOWER) for k in ctx.canonical):
        yield ctx.file(CONFIG), "unfreeze_mm_vision_tower", "true, but no tower is stored"


def _tower_dim(ctx: Context, field: str, pattern: str) -> int:
    """A dimension of the tower: its config's, else read off the published hub name
    (openai/clip-vit-large-patch14-336: patch 14, image 336)."""
    try:
        value = ctx.tower_config.get(field)
        if value:
            return value
    except NotApplicable:
        pass
    match = re.search(pattern, str(ctx.config.get("mm_vision_tower") or ""))
    if match:
        return int(match.group(1))
    raise NotApplicable(f"the tower's {field} is unknown (not a local folder)")


def _tower_image_size(ctx: Context) -> int:
    return _tower_dim(ctx, "image_size", r"patch\d+-(\d+)$")


def _anyres(ctx: Context) -> list[tuple[int, int]]:
    if ctx.config.get("image_aspect_ratio") != "anyres":
        raise NotApplicable("image_aspect_ratio is not anyres")
    raw = ctx.config.get("image_grid_pinpoints")
    if not raw:
        raise NotApplicable("no image_grid_pinpoints (config-field names that)")
    return parse_pinpoints(raw)


@rule("anyres-pinpoints-grid", "error", ("llava", "llava-hf"),
      "an image_grid_pinpoints entry is not a whole number of tower crops",
      "anyres divides the image into crops of the tower's size: the grid LLaVA computes then "
      "disagrees with the crops, and the feature reshape fails", "use multiples of the tower's "
      "image size (336: [336, 672], [672, 336], [672, 672], ...)",
      "haotian-liu/LLaVA#1300, InternLM/xtuner#641")
def anyres_pinpoints_grid(ctx: Context):
    size = _tower_image_size(ctx)
    for w, h in _anyres(ctx):
        if w % size or h % size:
            yield ctx.file(CONFIG), "image_grid_pinpoints", (
                f"[{w}, {h}] is not a multiple of the tower's {size} px crops")


@rule("image-newline-missing", "error", ("llava", "llava-hf"),
      "mm_patch_merge_type spatial_unpad without an image_newline tensor",
      "LLaVA's strict load: 'Missing key(s): model.image_newline'; from_pretrained leaves it "
      "random", "store image_newline, or use the merge the model was trained with",
      "InternLM/xtuner#641, haotian-liu/LLaVA#1300")
def image_newline_missing(ctx: Context):
    merge = ctx.config.get("mm_patch_merge_type") or "flat"
    hf_next = ctx.layout == "hf" and "LlavaNext" in " ".join(ctx.config.get("architectures")
                                                              or [])
    if ("unpad" in merge or hf_next) and IMAGE_NEWLINE not in ctx.canonical:
        yield str(ctx.path), IMAGE_NEWLINE, f"missing, but the merge is {merge!r}"


@rule("image-newline-shape", "error", ("llava", "llava-hf"),
      "image_newline is not one hidden_size vector",
      "'size mismatch for model.image_newline'", "store the [hidden_size] vector",
      "InternLM/xtuner#641")
def image_newline_shape(ctx: Context):
    shape = ctx.canonical.get(IMAGE_NEWLINE)
    if shape is None:
        raise NotApplicable("no image_newline is stored")
    if tuple(shape) != (ctx.lm.get("hidden_size"),):
        yield str(ctx.path), IMAGE_NEWLINE, (f"shape {list(shape)}, expected "
                                             f"[{ctx.lm.get('hidden_size')}]")


@rule("aspect-ratio-unknown", "warning", ("llava", "lora", "projector"),
      "image_aspect_ratio is none of LLaVA's values",
      "LLaVA's process_images squashes the image to a square for any other value, silently",
      "use 'pad' (v1.5), 'anyres' (v1.6) or 'square'", "haotian-liu/LLaVA#1300")
def aspect_ratio_unknown(ctx: Context):
    value = ctx.config.get("image_aspect_ratio")
    if value is not None and value not in ("pad", "square", "anyres"):
        yield ctx.file(CONFIG), "image_aspect_ratio", f"{value!r}: squashed to a square"


@rule("context-truncation", "warning", ("llava",),
      "tokenizer_model_max_length is shorter than the tokens one image becomes",
      "LLaVA slices the spliced sequence to tokenizer_model_max_length: image features, then "
      "the prompt, are cut off without a word", "raise tokenizer_model_max_length to the "
      "language model's context (e.g. 4096)", "JIA-Lab-research/MGM#33")
def context_truncation(ctx: Context):
    limit = ctx.config.get("tokenizer_model_max_length")
    if limit is None:
        raise NotApplicable("no tokenizer_model_max_length: no truncation")
    size = _tower_image_size(ctx)
    patch = _patch_size(ctx)
    side = size // patch
    tokens = side * side
    if ctx.config.get("image_aspect_ratio") == "anyres":
        cells = max((w // size) * (h // size) for w, h in _anyres(ctx))
        rows = max(h // size for _, h in _anyres(ctx)) * side
        tokens += cells * side * side + rows
    if limit < tokens:
        yield ctx.file(CONFIG), "tokenizer_model_max_length", (
            f"{limit}, but one image alone can be {tokens} tokens")


def _patch_size(ctx: Context) -> int:
    return _tower_dim(ctx, "patch_size", r"patch(\d+)")
