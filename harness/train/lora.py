"""LoRA fine-tuning (stage 2) in miniature, the LLaVA way, and QLoRA on CPU.

What LLaVA's `train.py` does with `--lora_enable True`: LoRA on every language-model linear
layer (`find_all_linear_names`; see harness.ops.lora for why the targets are anchored), the
projector trained in full beside it at its own learning rate (`--mm_projector_lr`, applied by
`LLaVATrainer.create_optimizer`, which splits the trainable parameters into decay / no-decay x
projector / rest), on `vicuna_v1` image-instruction conversations, then saved as adapter +
`non_lora_trainables.bin` + config.json.

QLoRA (`--bits 4`): the base loads as NF4 with double quantization (projector and lm_head left
unquantized), `prepare_model_for_kbit_training` freezes it and upcasts every unquantized half-
precision tensor to float32, and the LoRA layers go on top. A QLoRA adapter learned against the
*quantized* weights; `dequantized_base` writes the base as the adapter saw it, so merging onto
it can be compared with merging onto the original half-precision base (peft #2105).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint.atomic import atomic_dir
from ..checkpoint.reader import open_folder
from ..ops.lora import LoraSpec, apply_lora
from .data import collate, instruct_samples
from .loop import TrainError, batch_loss, train

LORA_LR = 2e-4  # LLaVA's finetune_lora.sh
MM_PROJECTOR_LR = 2e-5


def _is_projector(name: str) -> bool:
    return "mm_projector" in name


def _decays(name: str, module_types: dict[str, type]) -> bool:
    """The Trainer's rule: no weight decay for biases and normalisation weights."""
    owner = module_types.get(name.rsplit(".", 1)[0])
    is_norm = owner is not None and ("Norm" in owner.__name__)
    return not name.endswith("bias") and not is_norm


def param_groups(model, lr: float = LORA_LR, mm_projector_lr: float | None = None,
                 weight_decay: float = 0.0) -> list[dict]:
    """`LLaVATrainer.create_optimizer`'s groups over the trainable parameters: with
    `mm_projector_lr`, projector parameters get that rate; empty groups are left out."""
    types = {name: type(m) for name, m in model.named_modules()}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise TrainError("the model has no trainable parameters")
    groups = []
    for projector in ((False, True) if mm_projector_lr is not None else (None,)):
        for decay in (True, False):
            params = [p for n, p in trainable if _decays(n, types) == decay
                      and (projector is None or _is_projector(n) == projector)]
            if params:
                group = {"params": params, "weight_decay": weight_decay if decay else 0.0,
                         "lr": mm_projector_lr if projector else lr}
                groups.append(group)
    return groups


def prepare_qlora(model):
    """`prepare_model_for_kbit_training` without gradient checkpointing (LLaVA's default
    run has it on; it changes memory, not results)."""
    from peft import prepare_model_for_kbit_training  # heavy: peft

    if not getattr(model, "is_loaded_in_4bit", False):
        raise TrainError("QLoRA needs a model loaded in 4 bits (load_4bit=True)")
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


@dataclass
class LoraRun:
    losses: list[float]
    held_out_before: float
    held_out_after: float
    before: dict[str, torch.Tensor] = field(repr=False)


def train_lora(peft_model, tokenizer, image_processor, *, steps: int = 8, batch_size: int = 4,
               seed: int = 0, lr: float = LORA_LR, mm_projector_lr: float | None = None,
               warmup_ratio: float = 0.03) -> LoraRun:
    """Train a LoRA-wrapped LLaVA model (see `harness.ops.lora.apply_lora`) on `vicuna_v1`
    conversations; the held-out loss is taken on samples drawn with another seed."""
    config = peft_model.config
    dtype = _image_dtype(peft_model)
    samples = instruct_samples(tokenizer, steps * batch_size, seed)
    batches = [collate(samples[i:i + batch_size], image_processor, config, dtype=dtype)
               for i in range(0, len(samples), batch_size)]
    held_out = collate(instruct_samples(tokenizer, 2 * batch_size, seed + 1), image_processor,
                       config, dtype=dtype)
    before = snapshot(peft_model)
    loss_before = batch_loss(peft_model, held_out)
    groups = param_groups(peft_model, lr, mm_projector_lr)
    losses = train(peft_model, batches, groups, steps, warmup_ratio, lr=lr, seed=seed)
    peft_model.eval()
    return LoraRun(losses, loss_before, batch_loss(peft_model, held_out), before)


def _image_dtype(model) -> torch.dtype:
    projector = getattr(model.get_model(), "mm_projector", None)
    params = list(projector.parameters()) if projector is not None else []
    return params[0].dtype if params else torch.float32


def lora_model(model, spec: LoraSpec, qlora: bool = False):
    """The LoRA-wrapped model LLaVA trains: (QLoRA: prepared for k-bit training first)."""
    if qlora:
        model = prepare_qlora(model)
    return apply_lora(model, spec)


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every parameter, copied. (Parameters, not the state dict: a 4-bit layer's state dict
    re-serialises its quantization state on every call.)"""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def update_problems(before: dict[str, torch.Tensor], peft_model) -> list[str]:
    """After training: every LoRA and projector tensor changed, every other tensor (the base,
    the vision tower) bit-identical."""
    after = dict(peft_model.named_parameters())
    problems = []
    for name, old in before.items():
        same = torch.equal(old, after[name])
        trained = "lora_" in name or _is_projector(name)
        if trained and same:
            problems.append(f"{name} (trainable) did not change")
        elif not trained and not same:
            problems.append(f"{name} (frozen) changed")
    return problems


def effective_weight(module) -> torch.Tensor:
    """The weight a quantized linear layer actually applies, read off its output for the
    identity (bias removed), in float32. Not bitsandbytes' dequantize: on CPU an eval-mode
    forward repacks 4-bit weights for its AVX512-BF16 kernel (absmax rounded to bfloat16), and
    peft's `dequantize_module_weight` misreads that layout (errors larger than the weights)."""
    eye = torch.eye(module.in_features, dtype=torch.float32, device=module.weight.device)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(eye).float()
            if module.bias is not None:
                out = out - module.bias.float()
    finally:
        module.train(was_training)
    return out.T.contiguous()


def dequantized_base(model, base: Path, out: Path, force: bool = False) -> Path:
    """A copy of the checkpoint `base` in which every weight the 4-bit `model` holds quantized
    is replaced by the weight it effectively applies (`effective_weight`, cast to the base's
    dtype): the base a QLoRA adapter was actually trained against."""
    quantized = {f"{name}.weight": module for name, module in model.named_modules()
                 if type(module).__name__ in ("Linear4bit", "Linear8bitLt")}
    # Under peft a quantized layer is the `base_layer` of its LoRA wrapper.
    quantized = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): m
                 for k, m in quantized.items()}
    folder = open_folder(base)
    missing = sorted(set(quantized) - set(folder.tensors))
    if missing:
        raise TrainError(f"{base}: has no {missing[0]}, which the quantized model holds")
    with atomic_dir(Path(out), force) as tmp:
        for file in folder.files:
            state = {k: v.clone() for k, v in folder.read(list(folder.header(file))).items()}
            for key in [k for k in state if k in quantized]:
                state[key] = effective_weight(quantized[key]).to(state[key].dtype).cpu()
            _save_shard(state, tmp / file, folder.format)
        for path in Path(base).iterdir():
            if path.is_file() and path.name not in folder.files:
                (tmp / path.name).write_bytes(path.read_bytes())
    return Path(out)


def _save_shard(state: dict, path: Path, fmt: str) -> None:
    if fmt == "safetensors":
        from safetensors.torch import save_file  # heavy: safetensors.torch

        save_file(state, path, metadata={"format": "pt"})
    else:
        torch.save(state, path)
