"""Rules about LoRA adapter folders (peft's files and LLaVA's non_lora_trainables.bin), and
stage-1 projector folders (`mm_projector.bin`)."""

from __future__ import annotations

from ...checkpoint.problems import CheckpointError
from ..adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MULTIMODAL_KEYWORDS, NON_LORA_TRAINABLES,
                       PEFT_PREFIX, adapter_config_problems, adapter_keys, empty_adapter,
                       llava_trainable_keys)
from ..config import CONFIG
from ..keys import ORIGINAL, PROJECTOR_MARK
from ..tensors import shape_problems
from .context import Context
from .model import NotApplicable, rule

ADAPTERS = ("lora", "language_model_lora")


def _adapter(ctx: Context) -> tuple[str, dict]:
    """(file, tensors) of the adapter weights; NotApplicable when they are absent or
    unreadable (`adapter-unreadable` reports that)."""
    name = next((n for n in ADAPTER_WEIGHTS if ctx.has(n)), None)
    if name is None:
        raise NotApplicable("no adapter_model.safetensors or adapter_model.bin")
    try:
        return ctx.file(name), ctx.tensor_file(name)
    except CheckpointError as exc:
        raise NotApplicable(f"the adapter weights are unreadable ({exc})") from None


def _adapter_config(ctx: Context) -> dict:
    data = ctx.json_file(ADAPTER_CONFIG)
    if adapter_config_problems(data, ""):
        raise NotApplicable("adapter_config.json is malformed (adapter-config)")
    return data


@rule("adapter-config", "error", ADAPTERS,
      "adapter_config.json is missing a field or has one of the wrong type",
      "peft refuses it, or merges with the wrong rank or scaling",
      "restore the adapter_config.json the training wrote", "huggingface/peft#460")
def adapter_config(ctx: Context):
    try:
        data = ctx.json_file(ADAPTER_CONFIG)
    except CheckpointError as exc:
        yield ctx.file(ADAPTER_CONFIG), "", str(exc).split(": ", 1)[-1]
        return
    for problem in adapter_config_problems(data, ctx.file(ADAPTER_CONFIG)):
        yield ctx.file(ADAPTER_CONFIG), "", problem.split(": ", 1)[1]


@rule("adapter-unreadable", "error", ADAPTERS,
      "the adapter weights are missing or unreadable", "PeftModel.from_pretrained fails",
      "save the adapter again", "huggingface/transformers#24551")
def adapter_unreadable(ctx: Context):
    name = next((n for n in ADAPTER_WEIGHTS if ctx.has(n)), None)
    if name is None:
        yield str(ctx.path), "", "no adapter_model.safetensors or adapter_model.bin"
        return
    try:
        ctx.tensor_file(name)
    except CheckpointError as exc:
        yield ctx.file(name), "", str(exc).split(": ", 1)[-1]


@rule("adapter-empty", "error", ADAPTERS,
      "the adapter holds no LoRA tensor, or only empty ones (a ZeRO-3 save without gathering: "
      "the 443-byte adapter_model.bin)", "peft loads it without a word and the model is the "
      "base; LLaVA's merge script writes the base back as the 'merged' model", "save with LLaVA's "
      "get_peft_state_maybe_zero_3 (parameters gathered)", "huggingface/transformers#24551")
def adapter_empty(ctx: Context):
    file, tensors = _adapter(ctx)
    reason = empty_adapter(tensors)
    if reason:
        yield file, "", reason


@rule("adapter-missing-half", "error", ADAPTERS,
      "a LoRA module has lora_A without lora_B (or the other way round)",
      "peft warns 'missing adapter keys' and initializes the half: lora_B at zero, the module "
      "changes nothing", "save both halves", "huggingface/peft#2566")
def adapter_missing_half(ctx: Context):
    file, tensors = _adapter(ctx)
    for target, m in sorted(adapter_keys(tensors).modules.items()):
        if m.a is None or m.b is None:
            yield file, m.a or m.b or m.magnitude, (f"lora_{'A' if m.a is None else 'B'} of "
                                                    f"{target} is missing")


@rule("adapter-rank-mismatch", "error", ADAPTERS,
      "adapter_config.json's rank (r, rank_pattern) disagrees with the lora_A / lora_B shapes",
      "peft: 'size mismatch for ...lora_A...: [8, 4096] vs [64, 4096]'",
      "set r (and rank_pattern) to the rank the tensors have", "huggingface/peft#460")
def adapter_rank_mismatch(ctx: Context):
    file, tensors = _adapter(ctx)
    config = _adapter_config(ctx)
    patterns = config.get("rank_pattern") or {}
    for target, m in sorted(adapter_keys(tensors).modules.items()):
        if m.a is None or m.b is None:
            continue
        rank_a, rank_b = tensors[m.a].shape[0], tensors[m.b].shape[-1]
        module = target.removesuffix(".weight")
        r = next((v for k, v in patterns.items() if module.endswith(k)), config["r"])
        if not rank_a == rank_b == r:
            yield file, m.a, f"rank {rank_a} (B: {rank_b}), adapter_config.json says {r}"


@rule("adapter-zero-update", "warning", ADAPTERS,
      "every lora_B is all zero: the adapter changes nothing",
      "loads and merges fine, and the model is exactly the base",
      "ship the trained adapter (lora_B starts at zero and only training moves it)",
      "huggingface/transformers#24551")
def adapter_zero_update(ctx: Context):
    file, tensors = _adapter(ctx)
    halves = [m.b for m in adapter_keys(tensors).modules.values() if m.b]
    if halves and all(tensors[b].numel() == 0 or not bool(tensors[b].any()) for b in halves):
        yield file, "", f"all {len(halves)} lora_B tensor(s) are zero"


@rule("adapter-targets-multimodal", "warning", ("lora",),
      "the adapter adapts the vision tower or the projector",
      "the original builds the tower lazily from mm_vision_tower: a tower LoRA is dropped; a "
      "LoRA-wrapped projector breaks mm_projector.bin loading",
      "exclude mm_projector, vision_tower and vision_resampler from the targets, as LLaVA's "
      "find_all_linear_names does", "haotian-liu/LLaVA#1380, haotian-liu/LLaVA#1647")
def adapter_targets_multimodal(ctx: Context):
    file, tensors = _adapter(ctx)
    for target in sorted(adapter_keys(tensors).modules):
        if any(word in target for word in MULTIMODAL_KEYWORDS):
            yield file, target, "a LoRA on the multimodal part"


@rule("adapter-base-mismatch", "error", ADAPTERS,
      "the adapter does not fit the base given with --base (a module it adapts is missing "
      "there, or has other dims)", "peft drops what fits no module; a merge into another base "
      "gives 'garbled results'", "merge into the base the adapter was trained on",
      "haotian-liu/LLaVA#1406, LLaVA-VL/LLaVA-NeXT#253")
def adapter_base_mismatch(ctx: Context):
    if ctx.base is None:
        raise NotApplicable("no --base given")
    file, tensors = _adapter(ctx)
    base = ctx.base.canonical
    for target, m in sorted(adapter_keys(tensors).modules.items()):
        if m.a is None or m.b is None or any(w in target for w in MULTIMODAL_KEYWORDS):
            continue
        shape = base.get(target)
        want = (tensors[m.b].shape[0], tensors[m.a].shape[-1])
        if shape is None:
            yield file, target, f"adapts a module the base {ctx.base.path} does not have"
        elif tuple(shape) != want:
            yield file, target, (f"adapts a {want[0]}x{want[1]} weight, the base's is "
                                 f"{shape[0]}x{shape[1]}")


@rule("adapter-config-base-mismatch", "error", ("lora",),
      "the adapter folder's config.json describes another language model than the --base "
      "tensors", "load: a size mismatch inside from_pretrained; merge-lora would write a "
      "config that describes other tensors", "ship the config.json of the base the adapter "
      "was trained on", "haotian-liu/LLaVA#1406 (a merge into the wrong base)")
def adapter_config_base_mismatch(ctx: Context):
    if ctx.base is None:
        raise NotApplicable("no --base given")
    for problem in shape_problems(ctx.config, ctx.base.canonical, ctx.file(CONFIG),
                                  str(ctx.base.path)):
        yield ctx.file(CONFIG), "", problem.split(": ", 1)[1]


@rule("trainables-dropped", "error", ("lora",),
      "non_lora_trainables.bin keys that LLaVA's prefix stripping leaves naming no model tensor",
      "load_pretrained_model loads them with strict=False: silently ignored, the projector "
      "stays the base's (random)", "save the keys as LLaVA's training does "
      "(base_model.model.model.mm_projector.*)", "NVIDIA/audio-flamingo#82, haotian-liu/LLaVA#1416")
def trainables_dropped(ctx: Context):
    tensors = ctx.tensor_file(NON_LORA_TRAINABLES)
    for renamed, original in sorted(llava_trainable_keys(tensors).items()):
        if not (renamed.startswith(("model.", "lm_head.")) and ORIGINAL.covers(renamed)):
            yield ctx.file(NON_LORA_TRAINABLES), original, (f"becomes {renamed!r} after LLaVA's "
                                                            "prefix stripping: no model tensor")


@rule("trainables-missing", "warning", ("lora",),
      "a LLaVA LoRA folder without non_lora_trainables.bin",
      "the projector then comes from the base: random for a plain Vicuna base",
      "ship non_lora_trainables.bin from the training run", "haotian-liu/LLaVA#1416")
def trainables_missing(ctx: Context):
    if not ctx.has(NON_LORA_TRAINABLES):
        yield str(ctx.path), NON_LORA_TRAINABLES, "missing"


@rule("projector-file-keys", "error", ("projector",),
      "mm_projector.bin holds no key with 'mm_projector' in it",
      "stage 2's get_w keeps only keys containing 'mm_projector.': nothing is loaded and the "
      "projector stays random", "save the projector's state dict as LLaVA's stage 1 does",
      "haotian-liu/LLaVA#1687")
def projector_file_keys(ctx: Context):
    name = ctx.projector_file
    tensors = ctx.tensor_file(name)
    if not any(PROJECTOR_MARK in k for k in tensors):
        yield ctx.file(name), "", f"{len(tensors)} tensor(s), none of them a projector's"


@rule("stage1-im-start-end", "error", ("projector",),
      "mm_use_im_start_end is true but mm_projector.bin has no embed_tokens rows",
      "initialize_vision_tokenizer: KeyError 'model.embed_tokens.weight' (it reads the new "
      "tokens' rows from the stage-1 file)", "set mm_use_im_start_end false (LLaVA's scripts "
      "do), or save the embedding rows with the projector", "haotian-liu/LLaVA#470")
def stage1_im_start_end(ctx: Context):
    if not ctx.config.get("mm_use_im_start_end"):
        raise NotApplicable("mm_use_im_start_end is false")
    name = ctx.projector_file
    tensors = ctx.tensor_file(name)
    if not any(k.endswith("embed_tokens.weight") for k in tensors):
        yield ctx.file(name), "model.embed_tokens.weight", "missing"


__all__ = ["PEFT_PREFIX"]
