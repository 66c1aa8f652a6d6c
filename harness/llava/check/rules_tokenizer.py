"""Rules about the tokenizer and generation config, and how their ids relate to the embedding
rows: what LLaVA's loader reads with `AutoTokenizer.from_pretrained(path, use_fast=False)` and
`GenerationConfig.from_pretrained(path)`."""

from __future__ import annotations

import logging
import warnings

from ...checkpoint.problems import CheckpointError
from ..config import CONFIG
from ..kinds import TOKENIZER_FILES
from .context import Context
from .model import NotApplicable, rule

TOKENIZER_CONFIG = "tokenizer_config.json"
ADDED_TOKENS = "added_tokens.json"
GENERATION_CONFIG = "generation_config.json"
WITH_TOKENIZER = ("llava", "llava-hf", "language_model")


def embedding_rows(ctx: Context) -> int:
    """The rows of embed_tokens: stored, else what config.json says."""
    shape = ctx.canonical.get("model.embed_tokens.weight") if _has_weights(ctx) else None
    rows = shape[0] if shape else ctx.lm.get("vocab_size")
    if rows is None:
        raise NotApplicable("neither stored embeddings nor a vocab_size")
    return rows


def _has_weights(ctx: Context) -> bool:
    try:
        ctx.canonical
    except NotApplicable:
        return False
    return True


def _tokenizer(ctx: Context):
    """The tokenizer as LLaVA loads it (slow, offline), once; NotApplicable when the folder has
    none or it does not load (`tokenizer-missing`, `tokenizer-unloadable` say which)."""
    if "tokenizer" not in ctx.__dict__:
        ctx.__dict__["tokenizer"] = _load_tokenizer(ctx)
    tokenizer, error = ctx.__dict__["tokenizer"]
    if tokenizer is None:
        raise NotApplicable(error)
    return tokenizer


def _load_tokenizer(ctx: Context):
    if not any(ctx.has(n) for n in TOKENIZER_FILES):
        return None, "the folder has no tokenizer files"
    ctx.config  # a malformed config.json would fail the tokenizer for the config's sake

    from transformers import AutoTokenizer  # heavy: transformers

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(ctx.path, use_fast=False), None
    except Exception as exc:  # noqa: BLE001  (any refusal of transformers' is the finding)
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


@rule("tokenizer-missing", "error", WITH_TOKENIZER,
      "no tokenizer.model or tokenizer.json", "load_pretrained_model's AutoTokenizer fails "
      "('Can't load tokenizer'), or a tokenizer from elsewhere is used with other ids",
      "ship the tokenizer files the model was trained with", "haotian-liu/LLaVA#1309")
def tokenizer_missing(ctx: Context):
    if not any(ctx.has(n) for n in TOKENIZER_FILES):
        yield str(ctx.path), "", "no tokenizer.model or tokenizer.json"


@rule("tokenizer-class-stale", "error", WITH_TOKENIZER,
      "tokenizer_config.json names a tokenizer class transformers does not have (the early "
      "'LLaMATokenizer' spelling)", "AutoTokenizer: 'Tokenizer class LLaMATokenizer does not "
      "exist or is not currently imported'", "set tokenizer_class to LlamaTokenizer",
      "huggingface/transformers#22222, haotian-liu/LLaVA#1309")
def tokenizer_class_stale(ctx: Context):
    # heavy: transformers
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    data = ctx.json_file(TOKENIZER_CONFIG)
    name = data.get("tokenizer_class")
    if name is None:
        raise NotApplicable("tokenizer_config.json names no class")
    if not isinstance(name, str) or tokenizer_class_from_name(name) is None and \
            tokenizer_class_from_name(name.removesuffix("Fast")) is None:
        yield ctx.file(TOKENIZER_CONFIG), "tokenizer_class", f"{name!r} is no tokenizer class"


@rule("tokenizer-unloadable", "error", WITH_TOKENIZER,
      "the tokenizer files do not load", "load_pretrained_model fails at AutoTokenizer",
      "ship tokenizer files that load (tokenizer.model with its tokenizer_config.json)",
      "haotian-liu/LLaVA#1309")
def tokenizer_unloadable(ctx: Context):
    if not any(ctx.has(n) for n in TOKENIZER_FILES):
        raise NotApplicable("the folder has no tokenizer files (tokenizer-missing)")
    try:
        _tokenizer(ctx)
    except NotApplicable as exc:
        if "config.json" in str(exc):
            raise
        yield str(ctx.path), "", f"AutoTokenizer refuses it: {exc}"


@rule("tokenizer-beyond-embeddings", "error", WITH_TOKENIZER,
      "the tokenizer has more ids than embed_tokens has rows",
      "an id past the last row: 'index out of range in self' at the first such token",
      "resize the embeddings (and lm_head) to the tokenizer, or ship the tokenizer the model "
      "was trained with", "huggingface/transformers#24899")
def tokenizer_beyond_embeddings(ctx: Context):
    size, rows = len(_tokenizer(ctx)), embedding_rows(ctx)
    if size > rows:
        yield str(ctx.path), "model.embed_tokens.weight", (f"{rows} rows, the tokenizer has "
                                                            f"{size} ids")


@rule("added-token-out-of-range", "error", WITH_TOKENIZER,
      "added_tokens.json (or tokenizer_config.json's added tokens) gives an id beyond the "
      "embedding rows", "the token's id indexes past embed_tokens: 'index out of range'",
      "resize the embeddings to cover the added tokens, or drop them",
      "huggingface/transformers#24899, lm-sys/FastChat#153")
def added_token_out_of_range(ctx: Context):
    rows = embedding_rows(ctx)
    found = False
    for name, ids in _added_ids(ctx):
        found = True
        for token, token_id in ids:
            if not isinstance(token_id, int) or not 0 <= token_id < rows:
                yield ctx.file(name), str(token), f"id {token_id!r}, embeddings have {rows} rows"
    if not found:
        raise NotApplicable("no added tokens")


def _added_ids(ctx: Context):
    for name in (ADDED_TOKENS, TOKENIZER_CONFIG):
        if not ctx.has(name):
            continue
        data = ctx.json_file(name)
        if name == ADDED_TOKENS:
            yield name, list(data.items())
        elif isinstance(data.get("added_tokens_decoder"), dict):
            yield name, [((v or {}).get("content", k) if isinstance(v, dict) else k,
                          int(k) if k.isdigit() else k)
                         for k, v in data["added_tokens_decoder"].items()]


@rule("special-token-out-of-range", "error", WITH_TOKENIZER + ("lora",),
      "bos / eos / pad token id in config.json or generation_config.json beyond the vocabulary",
      "generate pads or stops with an id past the last row: 'index out of range' in batch "
      "generation, or never stops", "set the ids the tokenizer gives these tokens",
      "haotian-liu/LLaVA#1144, haotian-liu/LLaVA#1115")
def special_token_out_of_range(ctx: Context):
    rows = embedding_rows(ctx)
    for name in (CONFIG, GENERATION_CONFIG):
        try:
            data = ctx.json_file(name)
        except NotApplicable:
            continue
        for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = data.get(field)
            for token_id in value if isinstance(value, list) else [value]:
                if isinstance(token_id, int) and not isinstance(token_id, bool) and \
                        not 0 <= token_id < rows:
                    yield ctx.file(name), field, (f"{token_id}, the vocabulary has {rows} ids")


@rule("generation-config-invalid", "error", WITH_TOKENIZER + ("lora",),
      "generation_config.json is one transformers refuses by its own validation (sampling "
      "settings with do_sample false, ...)", "transformers warns at load and refuses to "
      "save it: a merge or finetune script that calls save_pretrained stops",
      "set do_sample: true, or drop the sampling settings", "haotian-liu/LLaVA#1144, PR #1115")
def generation_config_invalid(ctx: Context):
    from transformers import GenerationConfig  # heavy: transformers

    try:
        data = ctx.json_file(GENERATION_CONFIG)
    except CheckpointError as exc:
        yield ctx.file(GENERATION_CONFIG), "", str(exc).split(": ", 1)[-1]
        return
    hf_logger = logging.getLogger("transformers")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        GenerationConfig.from_dict(dict(data)).validate(strict=True)
    except Exception as exc:  # noqa: BLE001  (transformers' own verdict is the finding)
        lines = [line.strip("- ") for line in str(exc).splitlines() if line.strip()]
        yield ctx.file(GENERATION_CONFIG), "", "; ".join(lines[:3])
    finally:
        hf_logger.setLevel(level)


@rule("im-tokens-missing", "error", ("llava",),
      "mm_use_im_start_end (or mm_use_im_patch_token) is true but the tokenizer lacks the "
      "image tokens", "load_pretrained_model adds them and resizes the embeddings: the new "
      "rows are untrained, every image is framed by noise", "ship the tokenizer (and the "
      "embedding rows) the model was trained with, or set the flags false as LLaVA's scripts do",
      "haotian-liu/LLaVA#470")
def im_tokens_missing(ctx: Context):
    config = ctx.config
    wanted = (["<im_start>", "<im_end>"] if config.get("mm_use_im_start_end") else []) + \
        (["<im_patch>"] if config.get("mm_use_im_patch_token") else [])
    if not wanted:
        raise NotApplicable("mm_use_im_start_end and mm_use_im_patch_token are false")
    vocab = _tokenizer(ctx).get_vocab()
    for token in wanted:
        if token not in vocab:
            yield str(ctx.path), token, "not in the tokenizer: the loader adds an untrained row"
