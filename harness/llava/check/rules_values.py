"""Rules about the stored values: non-finite, empty, all-zero, beyond float16, and delta weights
shipped as full ones. One streaming pass over every tensor (values.py) serves them all."""

from __future__ import annotations

from ...checkpoint.paths import inside
from ...checkpoint.reader import scan_file
from ..kinds import ADAPTER_WEIGHTS, NON_LORA_TRAINABLES
from .context import Context
from .model import NotApplicable, rule
from .values import FP16_MAX, ValueStats, scan_values

WEIGHTED = ("llava", "llava-hf", "language_model", "lora", "projector")


def scanned(ctx: Context) -> dict[str, dict[str, ValueStats]]:
    """Stats of every tensor the folder stores, by file label: the model's weights, an
    adapter's weights and trainables, a stage-1 projector file. Computed once."""
    if "scanned" not in ctx.__dict__:
        ctx.__dict__["scanned"] = _scan(ctx)
    return ctx.__dict__["scanned"]


def _scan(ctx: Context) -> dict[str, dict[str, ValueStats]]:
    out: dict[str, dict[str, ValueStats]] = {}
    if ctx.kind in ("llava", "llava-hf", "language_model"):
        out[str(ctx.path)] = ctx.values
    for name in (*ADAPTER_WEIGHTS, NON_LORA_TRAINABLES, "mm_projector.bin",
                 "mm_projector.safetensors"):
        if ctx.kind in ("lora", "language_model_lora", "projector") and ctx.has(name):
            fmt = "safetensors" if name.endswith(".safetensors") else "bin"
            try:
                sources, _ = scan_file(inside(ctx.path, name), fmt, ctx.path / name)
            except Exception:  # noqa: BLE001  (unreadable files are the byte rules' finding)
                continue
            out[ctx.file(name)] = scan_values(sources)
    if not out:
        raise NotApplicable("no tensors to look at")
    return out


def _each(ctx: Context):
    for file, stats in scanned(ctx).items():
        for key, stat in sorted(stats.items()):
            yield file, key, stat


@rule("values-nonfinite", "error", WEIGHTED, "a tensor holds NaN or infinity",
      "every forward through it is NaN: 'probability tensor contains inf, nan', or empty "
      "answers", "retrain or re-export in bfloat16/float32; the last finite checkpoint",
      "haotian-liu/LLaVA#463, haotian-liu/LLaVA#1278")
def values_nonfinite(ctx: Context):
    for file, key, stat in _each(ctx):
        if stat.nonfinite:
            yield file, key, "holds NaN or infinity"


@rule("values-empty", "error", WEIGHTED, "a tensor with no elements (a ZeRO-3 shard saved "
      "without gathering)", "from_pretrained: 'size mismatch ... torch.Size([0])'; peft loads "
      "an adapter that does nothing", "save with the parameters gathered (zero3_save_16bit_model "
      "or LLaVA's get_peft_state_maybe_zero_3)", "huggingface/peft#2500, huggingface/transformers#24551")
def values_empty(ctx: Context):
    for file, key, stat in _each(ctx):
        if stat.numel == 0:
            yield file, key, "has no elements"


@rule("values-all-zero", "error", ("llava", "llava-hf", "language_model", "projector"),
      "a weight matrix or norm that is all zero", "the layer outputs nothing: a training that "
      "never updated it, or a save that lost it", "re-export from the training run",
      "huggingface/peft#2500")
def values_all_zero(ctx: Context):
    for file, key, stat in _each(ctx):
        if stat.all_zero and stat.numel > 1 and not key.endswith(".bias"):
            yield file, key, "is all zero"


@rule("values-fp16-overflow", "error", WEIGHTED,
      "a value beyond float16's range (65504) in a checkpoint LLaVA loads as float16",
      "load_pretrained_model always loads float16: the value becomes infinity, then NaN",
      "scale the weights back into range, or load in bfloat16 (the harness's `load --dtype`)",
      "haotian-liu/LLaVA#463")
def values_fp16_overflow(ctx: Context):
    for file, key, stat in _each(ctx):
        if not stat.nonfinite and stat.max_abs > FP16_MAX:
            yield file, key, f"|value| up to {stat.max_abs:.6g}"


NORM_SUFFIXES = ("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight")


@rule("delta-weights", "error", ("llava", "language_model"),
      "every norm weight is near zero: delta weights (to be added to the base) shipped as full "
      "weights", "loads without a word and answers garbage",
      "apply the delta to its base (LLaVA's apply_delta.py), or ship the merged weights",
      "haotian-liu/LLaVA#51")
def delta_weights(ctx: Context):
    norms = [(key, stat) for file, key, stat in _each(ctx)
             if key.endswith(NORM_SUFFIXES) and stat.mean_abs is not None]
    if not norms:
        raise NotApplicable("no norm weights to look at")
    if all(stat.mean_abs < 0.05 for _, stat in norms):
        largest = max(stat.mean_abs for _, stat in norms)
        yield str(ctx.path), "*layernorm.weight", (
            f"all {len(norms)} norm weights have mean |value| below 0.05 (largest "
            f"{largest:.3g}); trained norms sit near 1")
