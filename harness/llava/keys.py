"""The names of a LLaVA checkpoint's tensors, and its key layouts as declarative maps: original
LLaVA, llava-hf, plain Llama/Mistral.

A map is an ordered table of `source template -> target template`, gpt-fast style: `{}` stands
for one layer number, a trailing `*` for any remaining suffix (a whole sub-tree), and a target of
`None` means the tensor is dropped. The first rule that matches a key wins; a key no rule
matches is an error naming it (a strict map never guesses).

Every layout maps onto one canonical naming, the original LLaVA names (whose language-model
part is exactly the plain Llama/Mistral state dict). Stripping is `layout -> canonical -> plain`;
layout conversion is `layout A -> canonical -> layout B`, B's map inverted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import HarnessError

# One decoder layer of a Llama/Mistral language model, in state-dict order.
LAYER_TENSORS = (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
)
# The per-layer rotary buffer transformers < 4.31 persisted (float32); modern classes recompute
# it and transformers 5 silently ignores it when loading.
LEGACY_BUFFER = "model.layers.{}.self_attn.rotary_emb.inv_freq"
LM_TEMPLATES = ("model.embed_tokens.weight",
                *(f"model.layers.{{}}.{name}" for name in LAYER_TENSORS),
                "model.norm.weight", "lm_head.weight")

# Canonical names of the multimodal parts (original LLaVA layout).
PROJECTOR = "model.mm_projector.*"
VISION_TOWER = "model.vision_tower.*"
TOWER_MODEL = "model.vision_tower.vision_tower.vision_model.*"
RESAMPLER = "model.vision_resampler.*"
IMAGE_NEWLINE = "model.image_newline"
# The same as prefixes of concrete keys.
PROJECTOR_PREFIX = PROJECTOR.removesuffix("*")
VISION_TOWER_PREFIX = VISION_TOWER.removesuffix("*")
# A tower stored in the checkpoint: CLIPVisionTower's `vision_tower` attribute, then the model.
VISION_PREFIX = "model.vision_tower.vision_tower."
# What LLaVA's stage-2 `get_w` keeps of a projector key, wherever its prefix: the projector's
# own names (`0.weight`, ...) follow this mark.
PROJECTOR_MARK = "mm_projector."


class KeyMapError(HarnessError):
    """A key that no rule of a layout's map covers."""


@dataclass(frozen=True)
class _Rule:
    source: str
    target: str | None
    pattern: re.Pattern

    def apply(self, key: str) -> tuple[bool, str | None]:
        match = self.pattern.fullmatch(key)
        if match is None:
            return False, None
        if self.target is None:
            return True, None
        out = self.target
        for value in match.groups():
            out = out.replace("{}", value, 1) if "{}" in out else out.replace("*", value, 1)
        return True, out


def _placeholders(template: str) -> list[str]:
    return re.findall(r"\{\}|\*", template)


def _compile(template: str) -> re.Pattern:
    if "*" in template[:-1]:
        raise ValueError(f"key template {template!r}: '*' may only end a template")
    parts = re.split(r"(\{\}|\*)", template)
    regex = "".join(r"(\d+)" if p == "{}" else "(.+)" if p == "*" else re.escape(p)
                    for p in parts)
    return re.compile(regex)


class KeyMap:
    """An ordered `source template -> target template | None` table."""

    def __init__(self, name: str, rules: Mapping[str, str | None]):
        self.name = name
        self.rules: tuple[_Rule, ...] = ()
        compiled = []
        for source, target in rules.items():
            if target is not None and _placeholders(source) != _placeholders(target):
                raise ValueError(f"{name}: {source!r} -> {target!r}: placeholders differ")
            compiled.append(_Rule(source, target, _compile(source)))
        self.rules = tuple(compiled)

    def __repr__(self) -> str:
        return f"KeyMap({self.name!r}, {len(self.rules)} rules)"

    def covers(self, key: str) -> bool:
        return any(rule.apply(key)[0] for rule in self.rules)

    def __call__(self, key: str, where: str = "") -> str | None:
        """The key's target name, or None when it is dropped."""
        for rule in self.rules:
            matched, target = rule.apply(key)
            if matched:
                return target
        where = f"{where}: " if where else ""
        raise KeyMapError(f"{where}{key}: no rule of the {self.name} key map covers it "
                          "(refusing to guess where it goes)")

    def inverse(self, name: str) -> KeyMap:
        """target -> source, for the rules that keep a tensor (each target must be unique)."""
        inverted: dict[str, str] = {}
        for rule in self.rules:
            if rule.target is None:
                continue
            if rule.target in inverted:
                raise ValueError(f"{self.name}: {rule.target!r} has two sources; not invertible")
            inverted[rule.target] = rule.source
        return KeyMap(name, inverted)


def expand(template: str, num_layers: int) -> list[str]:
    """A `{}` template's concrete keys for layers 0..num_layers-1 (itself if it has none)."""
    if "{}" not in template:
        return [template]
    return [template.replace("{}", str(i)) for i in range(num_layers)]


def language_model_keys(num_layers: int, legacy_buffers: bool = False) -> list[str]:
    """Every key of a plain Llama/Mistral checkpoint, in state-dict order."""
    out = ["model.embed_tokens.weight"]
    for i in range(num_layers):
        names = [f"model.layers.{i}.{n}" for n in LAYER_TENSORS]
        if legacy_buffers:
            names.insert(4, LEGACY_BUFFER.replace("{}", str(i)))
        out += names
    return out + ["model.norm.weight", "lm_head.weight"]


def _identity(templates: Iterable[str]) -> dict[str, str]:
    return {t: t for t in templates}


# --- layout -> canonical -------------------------------------------------------------------

# The original LLaVA checkpoint (LlavaLlamaForCausalLM / LlavaMistralForCausalLM state dict).
ORIGINAL = KeyMap("original LLaVA", {
    **_identity(LM_TEMPLATES),
    LEGACY_BUFFER: LEGACY_BUFFER,
    PROJECTOR: PROJECTOR,
    VISION_TOWER: VISION_TOWER,
    RESAMPLER: RESAMPLER,
    IMAGE_NEWLINE: IMAGE_NEWLINE,
})

_HF_LM = {"language_model." + t: t for t in LM_TEMPLATES if t.startswith("model.")}
_HF_PROJECTOR = {
    "multi_modal_projector.linear_1.weight": "model.mm_projector.0.weight",
    "multi_modal_projector.linear_1.bias": "model.mm_projector.0.bias",
    "multi_modal_projector.linear_2.weight": "model.mm_projector.2.weight",
    "multi_modal_projector.linear_2.bias": "model.mm_projector.2.bias",
}

# llava-hf as published (llava-hf/llava-1.5-7b-hf): what this harness writes, and what both
# transformers 4.x and 5.x load with zero missing and zero unexpected keys.
HF = KeyMap("llava-hf", {
    **_HF_LM,
    "language_model.lm_head.weight": "lm_head.weight",
    "language_model." + LEGACY_BUFFER: LEGACY_BUFFER,
    **_HF_PROJECTOR,
    "vision_tower.vision_model.*": TOWER_MODEL,
    # LlavaNextForConditionalGeneration (llava-hf/llava-v1.6-*-hf) keeps it at the top level.
    "image_newline": IMAGE_NEWLINE,
})

# Every llava-hf spelling this harness reads: the published one, transformers 5's save_pretrained
# (a flattened tower, `vision_tower.embeddings...`), and transformers 5's in-memory names.
HF_READ = KeyMap("llava-hf (any transformers version)", {
    **{rule.source: rule.target for rule in HF.rules},
    "vision_tower.*": TOWER_MODEL,
    **{"model.language_model." + t.removeprefix("model."): t for t in LM_TEMPLATES
       if t.startswith("model.")},
    "lm_head.weight": "lm_head.weight",
    **{"model." + k: v for k, v in _HF_PROJECTOR.items()},
    "model.vision_tower.vision_model.*": TOWER_MODEL,
    "model.vision_tower.*": TOWER_MODEL,
    IMAGE_NEWLINE: IMAGE_NEWLINE,
})

# A CLIP tower folder (`mm_vision_tower`): CLIPVisionModel's on-disk keys. A full CLIPModel
# folder (as openai/clip-vit-large-patch14-336 is) also holds the text side, which LLaVA never
# loads.
TOWER_FOLDER = KeyMap("CLIP tower folder", {
    "vision_model.*": TOWER_MODEL,
    "text_model.*": None,
    "visual_projection.weight": None,
    "text_projection.weight": None,
    "logit_scale": None,
})

# --- canonical -> target ---------------------------------------------------------------------

# Stripping: the plain language model. The legacy buffers map to themselves here; whether
# they are kept is the caller's choice (LEGACY_BUFFER), everything multimodal is dropped.
PLAIN = KeyMap("plain Llama/Mistral", {
    **_identity(LM_TEMPLATES),
    LEGACY_BUFFER: LEGACY_BUFFER,
    PROJECTOR: None,
    VISION_TOWER: None,
    RESAMPLER: None,
    IMAGE_NEWLINE: None,
})

TO_HF = HF.inverse("canonical -> llava-hf")
TO_TOWER_FOLDER = TOWER_FOLDER.inverse("canonical -> CLIP tower folder")

LAYOUT_MAPS = {"original": ORIGINAL, "hf": HF_READ}


_LEGACY_PATTERN = _compile(LEGACY_BUFFER)
# Where an original-layout checkpoint stores a tuned tower (LLaVA-1.6): CLIPVisionModel's
# in-memory names follow (transformers 5 has no `vision_model.` level there).
STORED_TOWER = TOWER_MODEL.removesuffix("*")


def runs_stored_tower(config, tensor_keys: Iterable[str]) -> bool:
    """Whether the original runs the tower stored in the checkpoint: with
    `unfreeze_mm_vision_tower` (every LLaVA-1.6) it builds the tower at init, so
    `from_pretrained` loads the stored tensors over the folder's. `config`: a dict or a
    config object."""
    unfreeze = (config.get("unfreeze_mm_vision_tower") if isinstance(config, dict)
                else getattr(config, "unfreeze_mm_vision_tower", False))
    return bool(unfreeze) and any(k.startswith(STORED_TOWER) for k in tensor_keys)


def canonical_tower_key(key: str) -> str:
    """A stored tower's key under the canonical name: a checkpoint saved from transformers 5's
    in-memory model has no `vision_model.` level below the tower."""
    prefix = VISION_PREFIX
    if key.startswith(prefix) and not key.startswith(STORED_TOWER):
        return STORED_TOWER + key[len(prefix):]
    return key


def is_legacy_buffer(canonical_key: str) -> bool:
    return _LEGACY_PATTERN.fullmatch(canonical_key) is not None


def is_language_model_key(key: str) -> bool:
    """An original-layout key of the language model: not the projector, the vision tower, the
    resampler, image_newline or a legacy rotary buffer."""
    return not (key.startswith((PROJECTOR_PREFIX, VISION_TOWER.removesuffix("*"),
                                RESAMPLER.removesuffix("*")))
                or key == IMAGE_NEWLINE or key.endswith("rotary_emb.inv_freq"))


def layout_of(config: dict, keys: Iterable[str], where: str = "") -> str:
    """'original' or 'hf', from config.json, cross-checked against the tensor names."""
    by_config = "hf" if "text_config" in config or any(
        a.startswith("Llava") and a.endswith("ForConditionalGeneration")
        for a in config.get("architectures") or []) else "original"
    keys = list(keys)
    hf_named = any(k.startswith(("language_model.", "model.language_model.")) for k in keys)
    if hf_named != (by_config == "hf"):
        said = "llava-hf" if by_config == "hf" else "original LLaVA"
        found = "llava-hf" if hf_named else "original LLaVA"
        where = f"{where}: " if where else ""
        raise KeyMapError(f"{where}config.json describes the {said} layout but the tensors are "
                          f"named in the {found} layout (e.g. {keys[0] if keys else '?'})")
    return by_config
