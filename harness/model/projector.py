"""The multimodal projector: `linear`, `mlp{N}x_gelu`, `identity`.

Module structure decides the state-dict keys, so it mirrors the original exactly: `linear` is a
bare `nn.Linear` (keys `weight`, `bias`); `mlpNx_gelu` is an `nn.Sequential` of Linear, GELU,
Linear, ... (keys `0.*`, `2.*`, ...: GELU layers hold no tensors); `identity` holds nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from ..llava.projector import DEFAULT_TYPE, check_projector_type, mlp_depth


class IdentityProjector(nn.Module):
    """`identity`: image features pass through; needs mm_hidden_size == hidden_size."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x


def build_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """The projector module for a type; an unknown type is a ContractError naming it.

    The original builder silently defaults a missing type to `linear`; callers here must pass
    the type explicitly (see `projector_type_of_config`).
    """
    check_projector_type(projector_type)
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    if projector_type == "identity":
        return IdentityProjector()
    layers: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
    for _ in range(mlp_depth(projector_type) - 1):
        layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*layers)


def projector_type_of_config(config) -> str:
    """The config's `mm_projector_type`, defaulting to `linear` as the original does (old
    LLaVA-v1 configs have no such field)."""
    return getattr(config, "mm_projector_type", None) or DEFAULT_TYPE
