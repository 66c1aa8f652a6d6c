"""LLaVA -> litgpt (gpt-fast's model definition, maintained): `lit_model.pth` + `model_config.yaml`.

The language model is taken as `strip` takes it (either source layout -> canonical -> plain,
multimodal parts and legacy buffers dropped), then renamed by litgpt 0.5's own key map
(`copy_weights_hf_llama` in litgpt/scripts/convert_hf_checkpoint.py): q/k/v fused into
`transformer.h.N.attn.qkv.weight` as `torch.cat((q, k, v))`, which for row-major tensors is
their bytes one after another. So the fused tensor is three file ranges and the whole export
streams through the checkpoint layer's torch-free zip writer: never a tensor in memory, no
torch, no litgpt. `model_config.yaml` holds the litgpt `Config` fields of a Llama/Mistral
(YAML written as JSON scalars, which YAML reads as they are).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.atomic import atomic_dir
from ..checkpoint.files import copy_files
from ..checkpoint.paths import check_output
from ..checkpoint.quantized import scheme_of
from ..checkpoint.reader import scan_folder
from ..checkpoint.tensors import Piece, Source
from ..checkpoint.torch_zip import write_bin
from ..llava import keys
from ..llava.config import read_config
from .strip import LM_AUX_FILES, StripError, arch_of, plain_config, strip_mapper

WEIGHTS = "lit_model.pth"
CONFIG = "model_config.yaml"
QKV = "transformer.h.{}.attn.qkv.weight"
QKV_PARTS = ("q_proj", "k_proj", "v_proj")

# Plain Llama/Mistral -> litgpt, gpt-fast style; q/k/v all go to the fused tensor, in order.
LITGPT = keys.KeyMap("litgpt", {
    "model.embed_tokens.weight": "transformer.wte.weight",
    "model.layers.{}.input_layernorm.weight": "transformer.h.{}.norm_1.weight",
    "model.layers.{}.self_attn.q_proj.weight": QKV,
    "model.layers.{}.self_attn.k_proj.weight": QKV,
    "model.layers.{}.self_attn.v_proj.weight": QKV,
    "model.layers.{}.self_attn.o_proj.weight": "transformer.h.{}.attn.proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "transformer.h.{}.norm_2.weight",
    "model.layers.{}.mlp.gate_proj.weight": "transformer.h.{}.mlp.fc_1.weight",
    "model.layers.{}.mlp.up_proj.weight": "transformer.h.{}.mlp.fc_2.weight",
    "model.layers.{}.mlp.down_proj.weight": "transformer.h.{}.mlp.proj.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
})


def litgpt_config(plain: dict) -> dict:
    """litgpt `Config` fields for a plain Llama/Mistral config.json (as litgpt's own
    Llama-2 / Mistral entries in litgpt/config.py set them)."""
    heads = plain["num_attention_heads"]
    hidden = plain["hidden_size"]
    config = {
        "name": plain.get("_name_or_path") or plain["model_type"],
        "hf_config": {},
        "block_size": plain["max_position_embeddings"],
        "vocab_size": plain["vocab_size"],
        "padded_vocab_size": plain["vocab_size"],  # the checkpoint's rows, no padding
        "n_layer": plain["num_hidden_layers"],
        "n_head": heads,
        "n_embd": hidden,
        "n_query_groups": plain.get("num_key_value_heads") or heads,
        "head_size": plain.get("head_dim") or hidden // heads,
        "rotary_percentage": 1.0,
        "parallel_residual": False,
        "bias": False,
        "lm_head_bias": False,
        "norm_class_name": "RMSNorm",
        "norm_eps": plain["rms_norm_eps"],
        "mlp_class_name": "LLaMAMLP",
        "intermediate_size": plain["intermediate_size"],
        "rope_base": int(plain.get("rope_theta", 10000)),
    }
    if plain.get("sliding_window"):
        config["sliding_window_size"] = plain["sliding_window"]
    return config


def _scalar(value) -> str:
    text = json.dumps(value)
    # YAML 1.1 (PyYAML, which litgpt reads with) takes 1e-05 for a string: it wants a dot.
    if isinstance(value, float) and "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return text


def yaml_text(config: dict) -> str:
    """One `key: value` line per field, each value a JSON scalar (valid YAML)."""
    return "".join(f"{k}: {_scalar(v)}\n" for k, v in config.items())


def expected_state(config: dict) -> dict[str, tuple[int, ...]]:
    """key -> shape of litgpt's GPT state dict for `config` (litgpt/model.py's modules)."""
    e, h, g, s = config["n_embd"], config["n_head"], config["n_query_groups"], \
        config["head_size"]
    m, v = config["intermediate_size"], config["padded_vocab_size"]
    out = {"transformer.wte.weight": (v, e)}
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}."
        out |= {p + "norm_1.weight": (e,), p + "attn.qkv.weight": ((h + 2 * g) * s, e),
                p + "attn.proj.weight": (e, h * s), p + "norm_2.weight": (e,),
                p + "mlp.fc_1.weight": (m, e), p + "mlp.fc_2.weight": (m, e),
                p + "mlp.proj.weight": (e, m)}
    return out | {"transformer.ln_f.weight": (e,), "lm_head.weight": (v, e)}


def fused(key: str, parts: list[Source], where: Path) -> Source:
    """q, k and v as one tensor: their rows in order, their bytes one range after another."""
    first = parts[0]
    if any(p.dtype != first.dtype or p.shape[1:] != first.shape[1:] for p in parts):
        raise StripError(f"{where}: {key}: q/k/v differ in dtype or width "
                         f"({', '.join(f'{p.dtype}{list(p.shape)}' for p in parts)})")
    pieces = tuple(piece for p in parts for piece in _pieces(p, where))
    return Source(key, first.dtype, (sum(p.shape[0] for p in parts), *first.shape[1:]), pieces)


def _pieces(source: Source, where: Path) -> tuple[Piece, ...]:
    """A tensor's bytes as file ranges; a `.bin` tensor that is its whole storage record brings
    the record's CRC, so the fused record is copied in the kernel (its CRC combined)."""
    if source.owns_storage:
        s = source.storage
        return (Piece(s.path, s.offset, s.nbytes, crc=s.crc),)
    return source.contiguous().byte_pieces(where)


def litgpt_tensors(plain: list[Source], where: Path) -> list[Source]:
    """Plain-named tensors -> litgpt-named, in litgpt's state-dict order."""
    out: dict[str, Source] = {}
    qkv: dict[str, dict[str, Source]] = {}
    for source in plain:
        target = LITGPT(source.key, where=str(where))
        if target.endswith("attn.qkv.weight"):
            part = source.key.split(".")[-2]
            qkv.setdefault(target, {})[part] = source
            out.setdefault(target, None)  # keeps its place in the order
        else:
            out[target] = source.renamed(target)
    for target, parts in qkv.items():
        missing = [p for p in QKV_PARTS if p not in parts]
        if missing:
            raise StripError(f"{where}: {target} needs {', '.join(QKV_PARTS)}; "
                             f"{missing[0]} is missing")
        out[target] = fused(target, [parts[p] for p in QKV_PARTS], where)
    return list(out.values())


@dataclass
class ExportResult:
    out: Path
    layout: str
    arch: str
    tensors: int
    total_size: int
    files: list[str]


def check_export(tensors: list[Source], config: dict, where: Path) -> None:
    """Key set and shapes exactly litgpt's GPT for this config, before the output appears."""
    expected = expected_state(config)
    found = {t.key: t.shape for t in tensors}
    for key in sorted(expected.keys() ^ found.keys()):
        what = "missing" if key in expected else "unexpected"
        raise StripError(f"{where}: litgpt export: {what} {key}")
    for key, shape in expected.items():
        if found[key] != shape:
            raise StripError(f"{where}: litgpt export: {key} is {list(found[key])}, litgpt's "
                             f"GPT expects {list(shape)}")


def export_litgpt(ckpt: Path, out: Path, *, force: bool = False) -> ExportResult:
    """Write the language model of the LLaVA checkpoint at `ckpt` as a litgpt checkpoint."""
    check_output(Path(out), [Path(ckpt)])
    scanned = scan_folder(Path(ckpt))
    folder = scanned.folder
    config = read_config(folder.path)
    if scheme_of(config, folder.path / "config.json") is not None:
        raise StripError(f"{folder.path / 'config.json'}: a pre-quantized checkpoint; litgpt's "
                         "lit_model.pth holds float weights (strip it with --layout hf)")
    layout = keys.layout_of(config, scanned.tensors, where=str(folder.path))
    arch = arch_of(config, layout, folder.path / "config.json")
    mapper = strip_mapper(layout, False, folder.path, [])
    plain = [t for file, sources in scanned.files.items()
             for t in (mapper(file, s) for s in sources.values()) if t is not None]
    lit_config = litgpt_config(plain_config(config, layout, arch))
    tensors = litgpt_tensors(plain, folder.path)
    check_export(tensors, lit_config, folder.path)
    with atomic_dir(Path(out), force) as tmp:
        write_bin(tmp / WEIGHTS, tensors)
        (tmp / CONFIG).write_text(yaml_text(lit_config))
        files = copy_files(folder.path, tmp, LM_AUX_FILES)
    return ExportResult(Path(out), layout, arch, len(tensors), sum(t.nbytes for t in tensors),
                        [WEIGHTS, CONFIG, *files])
