"""Work bounded by the files, not by what a config claims: before any module is built from a
config, the folder must hold about the bytes and no more than the tensors such a model has (a
config claiming a 100,000x MLP, an index of a million tiny tensors, are refused at once)."""

from __future__ import annotations

from pathlib import Path

from .config import lm_fields
from .errors import ConfigError


def claimed_parameters(lm: dict) -> int:
    """How many language-model parameters a (checked) config claims: embeddings, every layer's
    attention and MLP, norms, lm_head."""
    h = lm.get("hidden_size", 4096)
    heads = lm.get("num_attention_heads", 32)
    kv = lm.get("num_key_value_heads") or heads
    head_dim = lm.get("head_dim") or h // max(heads, 1)
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2
    mlp = 3 * h * lm.get("intermediate_size", 11008)
    layer = attention + mlp + 2 * h
    return 2 * lm.get("vocab_size", 32000) * h + lm.get("num_hidden_layers", 32) * layer + h


# The most tensors a LLaVA model of a config can store: every language-model layer's, a legacy
# buffer each, a projector of up to 8 Linear layers, image_newline, a stored CLIP tower of up to
# 64 layers, and each linear split into up to 6 tensors by a pre-quantized layout.
_LAYER_TENSORS, _TOWER_LAYERS, _TOWER_LAYER_TENSORS, _QUANT_SPLIT = 10, 64, 16, 6


def tensor_bound(data: dict) -> int:
    layers = lm_fields(data).get("num_hidden_layers", 32)
    plain = layers * _LAYER_TENSORS + 3 + 16 + 1 + _TOWER_LAYERS * _TOWER_LAYER_TENSORS + 16
    return _QUANT_SPLIT * plain + 256


def check_folder_claims(folder, data: dict, where: Path | str) -> None:
    """Before any module is built or any header scanned past the index: the index of
    `folder` (a CheckpointFolder) lists no more tensors than a model of the config `data` can
    have, and the config claims no model far larger than the bytes the folder holds."""
    tensor_count = len(folder.weight_map) if folder.weight_map is not None else None
    stored_bytes = folder.total_size if folder.total_size is not None else sum(
        folder.file_path(f).stat().st_size for f in folder.files)
    bound = tensor_bound(data)
    if tensor_count is not None and tensor_count > bound:
        raise ConfigError(f"{where}: the checkpoint lists {tensor_count:,} tensors; a LLaVA "
                          f"model of this config has at most {bound:,}")
    check_claim(lm_fields(data), stored_bytes, where)


# A quantized folder stores 4 bits a parameter at the least; anything claimed beyond this many
# times what the folder holds is a config that lies about its model.
_SLACK = 4


def check_claim(lm: dict, stored_bytes: int, where: Path | str) -> None:
    """Refuse a config that claims a model far larger than the bytes in the folder, before any
    module is built from it: work stays bounded by the files, not by what a config says."""
    claimed = claimed_parameters(lm)
    if claimed / 2 > _SLACK * max(stored_bytes, 1):
        raise ConfigError(f"{where}: claims a {claimed:,}-parameter language model "
                          f"({claimed / 2e9:.1f} GB even at 4 bits), but the folder holds "
                          f"{stored_bytes:,} bytes of tensors")
