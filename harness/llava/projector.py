"""The multimodal projector as LLaVA's `build_vision_projector` defines it: `linear`,
`mlp{N}x_gelu`, `identity`; its parameter formula; and the type and dims its tensors imply.

The module structure decides the state-dict keys: `linear` is a bare Linear (`weight`, `bias`),
`mlpNx_gelu` a Sequential of Linear, GELU, Linear, ... (`0.*`, `2.*`, ...: GELU layers hold no
tensors), `identity` holds nothing. No torch here: the module itself is `harness.model.projector`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ContractError
from .keys import PROJECTOR_MARK

_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")
_LAYER = re.compile(r"^(\d+)\.(weight|bias)$")
TYPES_TEXT = "'linear', 'identity' or 'mlp{N}x_gelu' with N >= 1"
# LLaVA's builder: a config without mm_projector_type gets a linear projector (LLaVA-v1 configs
# have none; LLaVA issues #550, #465).
DEFAULT_TYPE = "linear"


def mlp_depth(projector_type: str) -> int | None:
    """Number of Linear layers of an `mlp{N}x_gelu` projector, None for other types."""
    match = _MLP_GELU.match(projector_type) if isinstance(projector_type, str) else None
    return int(match.group(1)) if match else None


def check_projector_type(projector_type, owner: str = "mm_projector_type") -> None:
    if projector_type in ("linear", "identity"):
        return
    depth = mlp_depth(projector_type)
    if depth is None or depth < 1:
        raise ContractError(f"{owner}={projector_type!r}: must be {TYPES_TEXT}")


def projector_params(projector_type: str, mm_hidden_size: int, hidden_size: int) -> int:
    """The formula: linear m*h + h; mlpNx_gelu adds N-1 layers of h*h + h; identity 0."""
    check_projector_type(projector_type)
    if projector_type == "identity":
        if mm_hidden_size != hidden_size:
            raise ContractError(f"projector 'identity' needs mm_hidden_size == hidden_size, got "
                                f"{mm_hidden_size} != {hidden_size}")
        return 0
    first = mm_hidden_size * hidden_size + hidden_size
    depth = 1 if projector_type == "linear" else mlp_depth(projector_type)
    return first + (depth - 1) * (hidden_size * hidden_size + hidden_size)


@dataclass(frozen=True)
class ProjectorShape:
    """A projector as its tensors describe it (dims are None for identity: no tensors)."""

    type: str
    mm_hidden_size: int | None
    hidden_size: int | None


def projector_entries(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The projector's own names (`0.weight`, ...), reduced as stage 2's `get_w` reduces them."""
    return {key.split(PROJECTOR_MARK, 1)[1]: shape for key, shape in shapes.items()
            if PROJECTOR_MARK in key}


def infer_projector(shapes: dict[str, tuple[int, ...]], where: str) -> ProjectorShape:
    """The type and dims from keys and shapes: `weight`/`bias` is linear; `0.`, `2.`, ...
    `2(N-1).` is mlpNx_gelu; none is identity. Any other key or shape is a ContractError."""
    own = projector_entries(shapes)
    if not own:
        return ProjectorShape("identity", None, None)
    if set(own) == {"weight", "bias"}:
        layers = {0: own}
        kind = "linear"
    else:
        layers = _mlp_layers(own, where)
        kind = f"mlp{len(layers)}x_gelu"
    first = layers[0].get("weight", ())
    if len(first) != 2:
        raise ContractError(f"{where}: the projector's first weight has shape {list(first)}, "
                            "expected [hidden_size, mm_hidden_size]")
    h, m = first
    for i, layer in layers.items():
        _check_layer(where, kind, i, layer, (h, m if i == 0 else h))
    return ProjectorShape(kind, m, h)


def _mlp_layers(own: dict, where: str) -> dict[int, dict[str, tuple[int, ...]]]:
    layers: dict[int, dict[str, tuple[int, ...]]] = {}
    for name, shape in own.items():
        match = _LAYER.match(name)
        if not match or int(match.group(1)) % 2:
            raise ContractError(f"{where}: projector tensor {name!r} fits no known projector "
                                "(linear: weight/bias; mlpNx_gelu: 0., 2., 4., ...)")
        layers.setdefault(int(match.group(1)) // 2, {})[match.group(2)] = shape
    expected = set(range(len(layers)))
    if set(layers) != expected:
        missing = min(expected - set(layers))
        raise ContractError(f"{where}: projector layer {2 * missing} is missing (an "
                            f"mlp{len(layers)}x_gelu has Linear layers at 0, 2, ...)")
    return layers


def _check_layer(where: str, kind: str, i: int, layer: dict, weight: tuple[int, int]) -> None:
    prefix = "" if kind == "linear" else f"{2 * i}."
    for name, want in (("weight", weight), ("bias", weight[:1])):
        got = layer.get(name)
        if got != want:
            what = "is missing" if got is None else f"has shape {list(got)}"
            raise ContractError(f"{where}: {PROJECTOR_MARK}{prefix}{name} {what}; an {kind} "
                                f"layer mapping {weight[1]} -> {weight[0]} needs {list(want)}")


def projector_type_from_shapes(shapes: dict[str, tuple]) -> str:
    """The type a set of projector tensors implies, from their names relative to
    `mm_projector.` (the loader's check, which needs only names: see `infer_projector` for dims).
    """
    names = set(shapes)
    if not names:
        return "identity"
    if names <= {"weight", "bias"} and "weight" in names:
        return "linear"
    indices = sorted({int(n.split(".")[0]) for n in names if n.split(".")[0].isdigit()})
    expected = {f"{i}.{p}" for i in indices for p in ("weight", "bias")}
    if indices and indices == list(range(0, 2 * len(indices), 2)) and names == expected:
        return f"mlp{len(indices)}x_gelu"
    raise ContractError(f"projector tensors {sorted(names)[:6]} match no projector type "
                        f"({TYPES_TEXT})")
