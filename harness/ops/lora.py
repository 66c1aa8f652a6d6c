"""LoRA the LLaVA way: which layers get adapters, the config, and saving the three files.

Targets. LLaVA's `find_all_linear_names` collects the *short* name of every `nn.Linear` outside
the projector, vision tower and resampler, minus `lm_head`, and hands those short names to peft.
peft matches a short name anywhere in the model, so once the CLIP tower is attached its
`q_proj`/`k_proj`/`v_proj` get adapters too. LLaVA escapes this only because it wraps the model
before the tower exists. Here the short names are turned into one anchored regex that excludes
the multimodal modules, so the adapted set is the language model's linears however the model
was built. Every peft version reads a regex `target_modules`, LLaVA's own loader's included.

Saving, as `llava/train/train.py` does after training: `config.json` (the model config),
`save_pretrained` of the adapter given an explicit state dict, and `non_lora_trainables.bin`
(every trainable tensor that is not LoRA: the projector, and the biases for `bias="all"` /
`"lora_only"`) under peft's `base_model.model.` key prefix. LLaVA's `get_peft_state_maybe_zero_3`
breaks on `bias="lora_only"`: it iterates a dict as (key, value) pairs, tests a stale name, and
derives bias names as `<module>.bias` where peft's wrapped layer holds `<module>.base_layer.bias`.
`lora_state` selects by module structure instead and handles all three modes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.atomic import atomic_dir
from ..checkpoint.reader import open_folder
from ..errors import HarnessError
from ..llava.adapter import MULTIMODAL_KEYWORDS, NON_LORA_TRAINABLES, PEFT_PREFIX
from ..llava.config import read_config
from ..llava.keys import PROJECTOR_PREFIX

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGET_SETS = ("attention", "all-linear")
BIAS_MODES = ("none", "all", "lora_only")


class LoraError(HarnessError):
    pass


def is_multimodal(name: str) -> bool:
    return any(k in name for k in MULTIMODAL_KEYWORDS)


def find_all_linear_names(model) -> list[str]:
    """LLaVA's rule: the short names of the linear layers outside the multimodal modules,
    `lm_head` excluded (sorted; LLaVA returns a set's order). bitsandbytes' Linear4bit/8bitLt
    subclass `nn.Linear`, so a quantized model gives the same names, and so does a model
    already wrapped by peft."""
    names = set()
    for name, module in model.named_modules():
        # On a model already wrapped, a layer's own Linear is its `base_layer`, and the
        # adapter's A/B are Linears too: report the layer, never peft's internals.
        name = name.removesuffix(".base_layer")
        if isinstance(module, torch.nn.Linear) and not is_multimodal(name) \
                and ".lora_" not in name:
            names.add(name.rsplit(".", 1)[-1])
    names.discard("lm_head")
    return sorted(names)


def target_names(model, targets) -> list[str]:
    """'attention' (q/k/v/o), 'all-linear' (LLaVA's find_all_linear_names) or explicit short
    names, each of which must name a language-model linear layer."""
    found = find_all_linear_names(model)
    if targets == "attention":
        chosen = [n for n in ATTENTION if n in found]
    elif targets == "all-linear":
        chosen = found
    elif isinstance(targets, (list, tuple)) and targets:
        unknown = [t for t in targets if t not in found and t != "lm_head"]
        if unknown:
            raise LoraError(f"LoRA target {unknown[0]!r} is not a linear layer of the language "
                            f"model (found: {', '.join(found)})")
        chosen = list(targets)
    else:
        raise LoraError(f"LoRA targets {targets!r}: expected {' | '.join(TARGET_SETS)} or a "
                        "list of layer names")
    if not chosen:
        raise LoraError(f"LoRA targets {targets!r} match no linear layer of the model")
    return chosen


def target_regex(names) -> str:
    """A `target_modules` regex (peft full-matches it against module names) for these short
    names, never matching inside the projector, vision tower or resampler."""
    excluded = "|".join(MULTIMODAL_KEYWORDS)
    alternatives = "|".join(re.escape(n) for n in sorted(names))
    return rf"^(?!.*(?:{excluded}))(?:.*\.)?(?:{alternatives})$"


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA set-up. Defaults are LLaVA's v1.5 LoRA script (r 128, alpha 256, all linear)."""

    r: int = 128
    alpha: float = 256
    targets: str | tuple[str, ...] = "all-linear"
    dropout: float = 0.05
    bias: str = "none"
    rslora: bool = False
    dora: bool = False
    # False: A and B random (peft's init_lora_weights=False), so an untrained adapter
    # already changes the output; True: B = 0 as in training.
    init: bool = True
    # LLaVA's LoRA fine-tuning also trains the projector in full (it is created after the
    # peft wrap, so it stays trainable): it is what non_lora_trainables.bin holds.
    train_projector: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise LoraError(f"LoRA rank {self.r!r}: expected a positive integer")
        if not self.alpha > 0:
            raise LoraError(f"LoRA alpha {self.alpha!r}: expected a positive number")
        if self.bias not in BIAS_MODES:
            raise LoraError(f"LoRA bias {self.bias!r}: expected one of {', '.join(BIAS_MODES)}")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r ** 0.5 if self.rslora else self.r)


def lora_config(model, spec: LoraSpec):
    from peft import LoraConfig  # heavy: peft

    return LoraConfig(r=spec.r, lora_alpha=spec.alpha,
                      target_modules=target_regex(target_names(model, spec.targets)),
                      lora_dropout=spec.dropout, bias=spec.bias, use_rslora=spec.rslora,
                      use_dora=spec.dora, init_lora_weights=spec.init, task_type="CAUSAL_LM")


def apply_lora(model, spec: LoraSpec):
    """`get_peft_model` with the spec's config; the vision tower stays frozen and the projector
    trains in full (unless the spec says otherwise), as in LLaVA's LoRA fine-tuning."""
    from peft import get_peft_model  # heavy: peft

    peft_model = get_peft_model(model, lora_config(model, spec))
    inner = model.get_model() if hasattr(model, "get_model") else None
    # bias="all" marks every bias trainable, the CLIP tower's too. LLaVA wraps the model
    # before the tower exists, so its tower never trains: freeze it again.
    tower = getattr(inner, "vision_tower", None)
    if tower is not None:
        tower.requires_grad_(False)
    projector = getattr(inner, "mm_projector", None)
    if projector is not None and spec.train_projector:
        projector.requires_grad_(True)
    return peft_model


def lora_layers(peft_model) -> dict[str, torch.nn.Module]:
    """Module name (peft's, `base_model.model.` prefixed) -> each layer carrying an adapter."""
    from peft.tuners.lora import LoraLayer  # heavy: peft

    return {name: module for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer)}


def _params(peft_model) -> dict[str, torch.Tensor]:
    # The tower is re-read from its own folder on load: nothing of it is ever saved.
    return {k: v for k, v in peft_model.named_parameters() if "vision_tower" not in k}


def lora_state(peft_model, bias: str) -> dict[str, torch.Tensor]:
    """What LLaVA's `get_peft_state_maybe_zero_3` is meant to select, for all three modes:
    the LoRA tensors, plus every bias ("all") or the biases of adapted layers ("lora_only")."""
    if bias not in BIAS_MODES:
        raise LoraError(f"LoRA bias {bias!r}: expected one of {', '.join(BIAS_MODES)}")
    params = _params(peft_model)
    keep = {k for k in params if "lora_" in k}
    if bias == "all":
        keep |= {k for k in params if k.endswith(".bias")}
    elif bias == "lora_only":
        keep |= {f"{name}.base_layer.bias" for name in lora_layers(peft_model)} & set(params)
    return {k: params[k].detach().cpu().clone() for k in sorted(keep)}


def non_lora_state(peft_model) -> dict[str, torch.Tensor]:
    """LLaVA's `get_peft_state_non_lora_maybe_zero_3`: every trainable tensor that is not
    LoRA. Keys name the unwrapped model's tensors (peft's `.base_layer.` dropped), so a loader
    that maps them onto the model finds each one."""
    return {k.replace(".base_layer.", "."): v.detach().cpu().clone()
            for k, v in _params(peft_model).items() if "lora_" not in k and v.requires_grad}


def save_llava_lora(peft_model, out: Path, force: bool = False) -> Path:
    """config.json + adapter (save_pretrained) + non_lora_trainables.bin, atomically."""
    bias = peft_model.peft_config["default"].bias
    config = peft_model.get_base_model().config
    with atomic_dir(Path(out), force) as tmp:
        use_cache = config.use_cache
        config.use_cache = True  # LLaVA turns the cache back on before saving
        try:
            config.save_pretrained(tmp)
        finally:
            config.use_cache = use_cache
        _drop_quantization_config(tmp / "config.json")
        peft_model.save_pretrained(tmp, state_dict=lora_state(peft_model, bias))
        torch.save(non_lora_state(peft_model), tmp / NON_LORA_TRAINABLES)
    return Path(out)


@torch.no_grad()
def randomize_adapter(peft_model, seed: int = 0, rel: float = 0.3,
                      dtype: torch.dtype | None = None) -> None:
    """Stand-in for training: seeded random A and B sized so each layer's update `s * B @ A`
    has about `rel` times its weight's spread (whatever the rank, alpha or rsLoRA), DoRA
    magnitudes and every other trainable tensor (projector, trained biases) nudged.
    `dtype` stores the adapter in that precision, as LLaVA's half-precision runs trained it."""
    gen = torch.Generator().manual_seed(seed)
    for module in lora_layers(peft_model).values():
        weight = module.get_base_layer().weight
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        r, fan_in = a.shape
        spread = rel * weight.float().std().item() / (module.scaling["default"] * r ** 0.5)
        a.copy_(torch.randn(a.shape, generator=gen) / fan_in ** 0.5)
        b.copy_(torch.randn(b.shape, generator=gen) * spread * fan_in ** 0.5)
        if "default" in module.lora_magnitude_vector:
            # DoRA's magnitude starts as the row norms of W + s * B @ A (peft set it from its
            # own random A and B): recompute it for the new ones, then move it 10%.
            m = module.lora_magnitude_vector["default"].weight
            merged = weight.float() + module.scaling["default"] * (b.float() @ a.float())
            m.copy_(torch.linalg.norm(merged, dim=1) * (1 + 0.1 * torch.randn(m.shape,
                                                                              generator=gen)))
    for name, p in peft_model.named_parameters():
        if p.requires_grad and "lora_" not in name:
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype)
                   * 0.05 * max(p.float().std().item(), 0.02))
        elif "lora_" in name and dtype is not None:
            p.data = p.data.to(dtype)


def _drop_quantization_config(path: Path) -> None:
    """QLoRA's model config carries the 4-bit `quantization_config`; LLaVA saves it as is, and
    a loader building the base from this config would then quantize it whatever it was asked.
    Quantization is a load-time choice: the adapter folder describes the full model."""
    data = json.loads(path.read_text())
    if data.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --- a synthetic adapter from checkpoint headers alone (real-size benchmarks) ----------------

def _header_linears(folder) -> dict[str, tuple[int, int]]:
    """Language-model linear layers of a checkpoint and their (out, in) shapes, from headers."""
    out = {}
    for key, meta in folder.tensors.items():
        if key.endswith(".weight") and len(meta.shape) == 2 and not is_multimodal(key) \
                and "embed_tokens" not in key and key != "lm_head.weight":
            out[key.removesuffix(".weight")] = meta.shape
    return out


def synthetic_adapter(base: Path, out: Path, spec: LoraSpec, dtype: torch.dtype, seed: int = 0,
                      force: bool = False) -> Path:
    """A LLaVA LoRA folder for `base` with random A/B (sized so the update is a fraction of a
    typical weight), written the peft way (adapter_config.json + adapter_model.safetensors)
    without instantiating the model: a real-size adapter costs only its own bytes."""
    from peft import LoraConfig  # heavy: peft
    from safetensors.torch import save_file  # heavy: safetensors.torch

    folder = open_folder(base)
    linears = _header_linears(folder)
    wanted = {"attention": set(ATTENTION), "all-linear": {k.rsplit(".", 1)[-1] for k in linears}}
    names = wanted.get(spec.targets, set(spec.targets) if isinstance(spec.targets, tuple)
                       else set())
    chosen = {k: s for k, s in linears.items() if k.rsplit(".", 1)[-1] in names}
    if not chosen:
        raise LoraError(f"{base}: LoRA targets {spec.targets!r} match no linear layer")
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (fan_out, fan_in) in sorted(chosen.items()):
        a = torch.randn(spec.r, fan_in, generator=gen) / fan_in ** 0.5
        # |scaling * B @ A| entries ~ 0.01: a trained adapter's order of magnitude.
        b = torch.randn(fan_out, spec.r, generator=gen) * (0.01 / (spec.scaling * spec.r ** 0.5))
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.to(dtype)
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.to(dtype)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=target_regex(names),
                        lora_dropout=spec.dropout, bias="none", use_rslora=spec.rslora,
                        task_type="CAUSAL_LM", base_model_name_or_path=str(base))
    projector = folder.read([k for k in folder.tensors if k.startswith(PROJECTOR_PREFIX)])
    with atomic_dir(Path(out), force) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        del tensors
        trainables = {f"{PEFT_PREFIX}{k}": (v.float() + 0.01 * torch.randn(v.shape, generator=gen)
                                              ).to(v.dtype) for k, v in projector.items()}
        torch.save(trainables, tmp / NON_LORA_TRAINABLES)
        (tmp / "config.json").write_text(json.dumps(read_config(Path(base)), indent=2) + "\n")
    return Path(out)
