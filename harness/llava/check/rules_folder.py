"""Rules about the folder as a whole: config.json against its schema, the weights' bytes and
index, the key layout, the language model's dims, the projector, and leftovers."""

from __future__ import annotations

from pathlib import Path

from ...checkpoint.problems import CheckpointError
from ..config import CONFIG, architectures, is_llava_field, missing_fields, names_of
from ..errors import ContractError
from ..keys import (IMAGE_NEWLINE, LAYOUT_MAPS, PROJECTOR_PREFIX, VISION_TOWER, KeyMapError,
                    layout_of)
from ..kinds import kind_from_name
from ..projector import DEFAULT_TYPE, infer_projector
from ..tensors import shape_problems
from .context import Context
from .model import ALL_KINDS, FULL, NotApplicable, rule

WEIGHTED = ("llava", "llava-hf", "language_model")


@rule("config-missing", "error", ("llava", "llava-hf", "lora", "projector", "language_model"),
      "the folder has no config.json",
      "LLaVA's builder and transformers' from_pretrained stop: no config to build the model from",
      "ship the config.json the model was trained with", "haotian-liu/LLaVA#1687")
def config_missing(ctx: Context):
    if ctx.raw_config is None:
        yield ctx.file(CONFIG), "", "missing"


@rule("config-field", "error", ALL_KINDS,
      "a config.json field is malformed: wrong type, out of range, or against another field",
      "the loaders fail deep inside (a tensor of negative size, an unknown activation) or build "
      "the wrong model", "give the field the value the schema names (docs/checks.md)",
      "meta-llama/llama3#299, hiyouga/LlamaFactory#4986 (a rope_scaling the loader refuses)")
def config_field(ctx: Context):
    try:
        if ctx.raw_config is None:
            return
    except CheckpointError as exc:
        yield ctx.file(CONFIG), "", str(exc).split(": ", 1)[-1]
        return
    for problem in ctx.config_problems:
        where, _, what = problem.partition(": ")
        yield where, what.split(" ", 1)[0], what


@rule("config-incomplete", "error", FULL,
      "a full LLaVA config.json lacks a field the loaders build the model from",
      "the original defaults it (a 4096-wide, 32-layer Llama; a linear projector) or stops "
      "with a KeyError; transformers builds its own defaults", "add the field with the value "
      "the weights have", "haotian-liu/LLaVA#1161")
def config_incomplete(ctx: Context):
    for name in missing_fields(ctx.config):
        yield ctx.file(CONFIG), name, "missing"


@rule("weights-unreadable", "error", WEIGHTED,
      "a shard is truncated, not what its name says (a git-lfs pointer), or disagrees with the "
      "index", "transformers: UnpicklingError / 'failed finding central directory'; or zeros "
      "where a record was cut short", "download the shard again (git lfs pull); rebuild the index",
      "haotian-liu/LLaVA#507, vllm-project/vllm#1382")
def weights_unreadable(ctx: Context):
    for problem in ctx.weight_problems:
        where, _, what = problem.partition(": ")
        yield where, "", what


@rule("weights-missing", "error", WEIGHTED, "a model folder without model weights",
      "from_pretrained: 'no file named pytorch_model.bin'", "ship the shards and their index",
      "haotian-liu/LLaVA#900")
def weights_missing(ctx: Context):
    try:
        ctx.weights
    except NotApplicable as exc:
        if "no model weights" in str(exc):
            yield str(ctx.path), "", "no pytorch_model*.bin or model*.safetensors"


@rule("layout-mismatch", "error", FULL,
      "config.json describes one key layout (original LLaVA or llava-hf), the tensors are named "
      "in the other", "LlavaForConditionalGeneration leaves every weight newly initialized; "
      "LLaVA's builder 'Unrecognized configuration class'",
      "convert the folder (`llava-harness convert DIR -o OUT --to hf`), or ship the config of "
      "the layout the tensors have",
      "haotian-liu/LLaVA#1567, huggingface/transformers#28404")
def layout_mismatch(ctx: Context):
    try:
        layout_of(ctx.config, ctx.sources)
    except KeyMapError as exc:
        yield ctx.file(CONFIG), "architectures", str(exc).split(": ", 1)[-1]


@rule("unknown-tensors", "error", FULL,
      "tensors no rule of the folder's layout covers",
      "from_pretrained warns 'weights not used' and drops them", "remove them, or fix their names",
      "ggml-org/llama.cpp#5248")
def unknown_tensors(ctx: Context):
    layout = LAYOUT_MAPS[ctx.layout]
    for key in sorted(ctx.logical):
        if not layout.covers(key):
            source = ctx.sources.get(key)
            file = ctx.path / source.file if source is not None else ctx.path
            yield str(file), key, "matches no tensor of a LLaVA model"


@rule("config-tensors-disagree", "error", WEIGHTED,
      "config.json's language model (vocab, hidden, heads, MLP, layers) disagrees with the "
      "stored tensors", "transformers: 'size mismatch for model.embed_tokens.weight'; a merge "
      "writes a config that describes other tensors", "ship the config of these weights",
      "haotian-liu/LLaVA#1161, huggingface/transformers#24899")
def config_tensors_disagree(ctx: Context):
    for problem in shape_problems(ctx.config, ctx.canonical, ctx.file(CONFIG), str(ctx.path)):
        yield ctx.file(CONFIG), "", problem.split(": ", 1)[1]


_CLASSES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral",
            "LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral",
            "llama": "llama", "mistral": "mistral", "LlamaForCausalLM": "llama",
            "MistralForCausalLM": "mistral"}


@rule("model-type-mismatch", "error", ("llava", "language_model", "lora"),
      "model_type and architectures name different backbones (llava_mistral over a Llama "
      "class), or a Mistral type over Llama-2's geometry",
      "LLaVA's builder picks the class from the name: the other backbone is built and loads "
      "with missing or ignored keys", "make model_type and architectures name the backbone the "
      "weights are", "LLaVA-VL/LLaVA-NeXT#213, InternLM/xtuner#748")
def model_type_mismatch(ctx: Context):
    config = ctx.config
    said = {_CLASSES[n] for n in [config.get("model_type"), *architectures(config)]
            if n in _CLASSES}
    if len(said) > 1:
        yield ctx.file(CONFIG), "model_type", (
            f"model_type {config.get('model_type')!r} and architectures "
            f"{architectures(config)} name different backbones")
    elif said == {"mistral"} and config.get("rope_theta") == 10000.0 and \
            config.get("num_key_value_heads") in (None, config.get("num_attention_heads")) \
            and config.get("sliding_window") is None:
        yield ctx.file(CONFIG), "model_type", (
            "a Mistral model_type over Llama-2's geometry (rope_theta 10000, no grouped-query "
            "attention, no sliding window)")


@rule("projector-missing", "error", ("llava",),
      "a full LLaVA checkpoint without projector tensors",
      "LLaVA's from_pretrained warns 'newly initialized: model.mm_projector.*' and answers with "
      "a random projector", "ship the projector (it is in non_lora_trainables.bin or "
      "mm_projector.bin of the run)", "haotian-liu/LLaVA#1345")
def projector_missing(ctx: Context):
    config = ctx.config
    if not config.get("mm_vision_tower"):
        raise NotApplicable("config.json names no vision tower")
    if config.get("mm_projector_type") == "identity":
        raise NotApplicable("an identity projector holds no tensors")
    if not any(k.startswith(PROJECTOR_PREFIX) for k in ctx.canonical):
        yield str(ctx.path), PROJECTOR_PREFIX + "*", "no projector tensor is stored"


@rule("projector-type-mismatch", "error", ("llava", "projector"),
      "mm_projector_type disagrees with the projector tensors (or is absent and they are not "
      "linear)", "LLaVA's builder builds the configured type (linear when absent): "
      "'Missing key(s) 0.weight' in a strict load, a random projector in from_pretrained",
      "set mm_projector_type to the type the tensors describe",
      "haotian-liu/LLaVA#577, haotian-liu/LLaVA#550")
def projector_type_mismatch(ctx: Context):
    shapes, where = _projector_shapes(ctx)
    try:
        inferred = infer_projector(shapes, where)
    except ContractError as exc:
        yield where, PROJECTOR_PREFIX + "*", str(exc).split(": ", 1)[-1]
        return
    configured = ctx.config.get("mm_projector_type") or DEFAULT_TYPE
    if shapes and inferred.type != configured:
        said = repr(ctx.config["mm_projector_type"]) if "mm_projector_type" in ctx.config \
            else f"nothing (so {DEFAULT_TYPE!r})"
        yield ctx.file(CONFIG), "mm_projector_type", (
            f"says {said}, but the tensors in {where} are an {inferred.type!r} projector")


@rule("projector-dims", "error", ("llava", "projector"),
      "mm_hidden_size / hidden_size disagree with the projector's input / output widths",
      "'size mismatch for model.mm_projector.0.weight'", "set mm_hidden_size to the tower's "
      "width and pair the projector with its language model", "haotian-liu/LLaVA#1161")
def projector_dims(ctx: Context):
    shapes, where = _projector_shapes(ctx)
    try:
        inferred = infer_projector(shapes, where)
    except ContractError:
        raise NotApplicable("the projector tensors fit no type (projector-type-mismatch)")
    if inferred.hidden_size is None:
        raise NotApplicable("an identity projector holds no tensors")
    m, h = ctx.config.get("mm_hidden_size"), ctx.lm.get("hidden_size")
    if m is None or h is None:
        raise NotApplicable("config.json lacks mm_hidden_size or hidden_size (config-incomplete)")
    if (m, h) != (inferred.mm_hidden_size, inferred.hidden_size):
        yield ctx.file(CONFIG), "mm_hidden_size", (
            f"mm_hidden_size {m} -> hidden_size {h}, but the projector in {where} maps "
            f"{inferred.mm_hidden_size} -> {inferred.hidden_size}")


def _projector_shapes(ctx: Context) -> tuple[dict, str]:
    """The projector tensors' shapes (original names) and where they are stored."""
    if ctx.kind == "projector":
        name = ctx.projector_file
        tensors = ctx.tensor_file(name)
        return {k: tuple(v.shape) for k, v in tensors.items()}, ctx.file(name)
    if not ctx.config.get("mm_vision_tower"):
        raise NotApplicable("config.json names no vision tower")
    shapes = {k: v for k, v in ctx.canonical.items() if k.startswith(PROJECTOR_PREFIX)}
    return shapes, str(ctx.path)


@rule("plain-leftovers", "error", ("language_model",),
      "a plain Llama/Mistral folder still holds multimodal tensors (projector, image_newline, "
      "vision tower)", "LlamaForCausalLM warns 'weights not used'; llama.cpp's converter "
      "stops at 'Unexpected tensor name'", "strip them: `llava-harness strip DIR -o OUT`",
      "ggml-org/llama.cpp#5248")
def plain_leftovers(ctx: Context):
    tower = VISION_TOWER.removesuffix("*")
    for key, source in sorted(ctx.sources.items()):
        if "mm_projector" in key or key.endswith("image_newline") or key.startswith(tower) \
                or ".vision_tower." in key:
            yield str(ctx.path / source.file), key, "a multimodal tensor in a plain model"


@rule("plain-llava-fields", "error", ("language_model",),
      "a plain Llama/Mistral config.json still carries LLaVA fields or a LLaVA class",
      "AutoModelForCausalLM builds from model_type: 'llava' is transformers' LlavaConfig, which "
      "it cannot load as a causal LM", "write the plain config (as `llava-harness strip DIR -o OUT` "
      "does)",
      "ggml-org/llama.cpp#5248")
def plain_llava_fields(ctx: Context):
    config = ctx.config
    for name in sorted(config):
        if is_llava_field(name):
            yield ctx.file(CONFIG), name, "a LLaVA field in a plain model's config"
    if "llava" in names_of(config):
        yield ctx.file(CONFIG), "model_type", (f"model_type {config.get('model_type')!r} / "
                                               f"architectures {architectures(config)} name a "
                                               "LLaVA class")


@rule("lm-head-missing", "error", ("llava", "language_model"),
      "no lm_head.weight is stored and tie_word_embeddings is false",
      "from_pretrained initializes lm_head at random: the answers are gibberish",
      "store lm_head.weight, or set tie_word_embeddings: true if the model was trained tied",
      "LLaVA-VL/LLaVA-NeXT#273")
def lm_head_missing(ctx: Context):
    if "lm_head.weight" not in ctx.canonical and not ctx.lm.get("tie_word_embeddings", False):
        yield str(ctx.path), "lm_head.weight", "not stored, and the config does not tie it"


@rule("folder-name-routing", "warning", ("llava", "lora", "projector"),
      "the folder's name routes LLaVA's load_pretrained_model to another path than its files",
      "the original picks its path from the name: without 'llava' in it, a LLaVA folder loads "
      "as a plain language model and the projector is ignored",
      "put 'llava' in the folder name (and 'lora' for an adapter), as LLaVA's scripts do",
      "haotian-liu/LLaVA#444, haotian-liu/LLaVA#1021")
def folder_name_routing(ctx: Context):
    base = ctx.base.path if ctx.base else (None if ctx.kind == "llava" else Path("base"))
    by_name = kind_from_name(ctx.path.name, base)
    if by_name != ctx.kind:
        yield str(ctx.path), "", (f"the name {ctx.path.name!r} means {by_name!r} to the "
                                  f"original loader, the files say {ctx.kind!r}")


@rule("image-newline-unused", "warning", ("llava",),
      "image_newline is stored but mm_patch_merge_type does not use it",
      "ignored: a model trained with it answers from features laid out another way",
      "set mm_patch_merge_type to the merge the model was trained with (spatial_unpad)",
      "LLaVA-VL/LLaVA-NeXT#213")
def image_newline_unused(ctx: Context):
    if IMAGE_NEWLINE in ctx.canonical and "unpad" not in str(
            ctx.config.get("mm_patch_merge_type") or "flat"):
        yield str(ctx.path), IMAGE_NEWLINE, (f"stored, but mm_patch_merge_type is "
                                             f"{ctx.config.get('mm_patch_merge_type', 'flat')!r}")
