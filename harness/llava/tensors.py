"""What a (checked) config says the language model's tensors are, against what is stored.

A config that disagrees with its tensors is the classic silent fault: an adapter folder whose
config.json says 515 rows over a base of 512, a 13B config over 7B weights. transformers
refuses some of it deep inside `from_pretrained` (a size mismatch, an internal error here), and
writes the rest into a merged output. Compared here from file headers alone, before any of that.
"""

from __future__ import annotations

from ..checkpoint.quantized import logical_shapes, quantized_linears, scheme_of
from .config import CONFIG, is_hf_layout, lm_fields
from .errors import ConfigError
from .keys import LAYER_TENSORS, LAYOUT_MAPS


def expected_shapes(data: dict, layer: int = 0) -> dict[str, tuple[int, ...]]:
    """The shapes a Llama/Mistral of this config stores for its embeddings, head, final norm
    and one layer (original-layout names), for the fields the config states."""
    lm = lm_fields(data)
    h, heads = lm.get("hidden_size"), lm.get("num_attention_heads")
    if h is None or heads is None:
        return {}
    kv = lm.get("num_key_value_heads") or heads
    head_dim = lm.get("head_dim") or h // heads
    out = {"model.norm.weight": (h,),
           f"model.layers.{layer}.self_attn.q_proj.weight": (heads * head_dim, h),
           f"model.layers.{layer}.self_attn.k_proj.weight": (kv * head_dim, h),
           f"model.layers.{layer}.self_attn.v_proj.weight": (kv * head_dim, h),
           f"model.layers.{layer}.self_attn.o_proj.weight": (h, heads * head_dim),
           f"model.layers.{layer}.input_layernorm.weight": (h,),
           f"model.layers.{layer}.post_attention_layernorm.weight": (h,)}
    if lm.get("intermediate_size") is not None:
        inter = lm["intermediate_size"]
        out.update({f"model.layers.{layer}.mlp.gate_proj.weight": (inter, h),
                    f"model.layers.{layer}.mlp.up_proj.weight": (inter, h),
                    f"model.layers.{layer}.mlp.down_proj.weight": (h, inter)})
    if lm.get("vocab_size") is not None:
        out.update({"model.embed_tokens.weight": (lm["vocab_size"], h),
                    "lm_head.weight": (lm["vocab_size"], h)})
    assert {k.split(f"layers.{layer}.", 1)[-1] for k in out if ".layers." in k} <= \
        set(LAYER_TENSORS)
    return out


def layer_count(keys) -> int:
    """How many decoder layers the stored keys hold (one past the highest index)."""
    highest = -1
    for key in keys:
        if key.startswith("model.layers."):
            index = key.split(".", 3)[2]
            if index.isdigit():
                highest = max(highest, int(index))
    return highest + 1


def shape_problems(data: dict, shapes: dict[str, tuple[int, ...]], config_where: str,
                   tensors_where: str) -> list[str]:
    """Where the config's language model and the stored (logical, original-layout) tensors
    disagree: a dimension, or the number of layers. A tensor that is absent is not judged here
    (a tied lm_head, a base that supplies it)."""
    problems = []
    for key, want in expected_shapes(data).items():
        got = shapes.get(key)
        if got is not None and tuple(got) != want:
            problems.append(f"{config_where}: says {key} is {list(want)}, but {tensors_where} "
                            f"stores {list(got)}")
    layers = layer_count(shapes)
    claimed = lm_fields(data).get("num_hidden_layers")
    if layers and claimed is not None and layers != claimed:
        problems.append(f"{config_where}: num_hidden_layers is {claimed}, but {tensors_where} "
                        f"stores {layers} layers")
    return problems


def logical_shapes_of(sources: dict, data: dict, folder) -> dict[str, tuple[int, ...]]:
    """Every stored tensor's shape as the unquantized model has it (a pre-quantized linear's
    packed weight and state become its float weight), under its stored name."""
    scheme = scheme_of(data, f"{folder}/{CONFIG}")
    if scheme is None:
        return {k: tuple(s.shape) for k, s in sources.items()}
    return logical_shapes(sources, quantized_linears(scheme, sources, folder))


def canonical_shapes(shapes: dict[str, tuple[int, ...]], data: dict) -> dict:
    """Shapes under their original-layout names; a name the layout's map does not cover is
    left out (the linter names it)."""
    layout = LAYOUT_MAPS["hf" if is_hf_layout(data) else "original"]
    return {name: shape for key, shape in shapes.items() if layout.covers(key)
            for name in [layout(key)] if name is not None}


def check_config_fits(data: dict, sources: dict, folder, error=None) -> None:
    """Raise (`error`, a ConfigError by default) at the first disagreement between the config
    and the stored tensors."""
    shapes = canonical_shapes(logical_shapes_of(sources, data, folder), data)
    problems = shape_problems(data, shapes, f"{folder}/{CONFIG}", str(folder))
    if problems:
        raise (error or ConfigError)(problems[0])
