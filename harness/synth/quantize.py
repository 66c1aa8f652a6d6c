"""Pre-quantized synthetic checkpoints: the float layout with its decoder linears quantized.

Which tensors a quantized linear becomes is the checkpoint layer's knowledge
(harness/checkpoint/quantized.py); this module plans them and makes their bytes:

- bitsandbytes (nf4, nf4-dq, fp4, int8): the linear's deterministic float weight quantized by
  bitsandbytes' own functions, serialized as transformers' `save_pretrained` serializes them
  (`QuantState.as_dict(packed=True)`, LLM.int8's `SCB` and `weight_format`). Same spec, same
  bytes: the fill is deterministic and so is the quantization on one machine.
- GPTQ / AWQ: key-level layouts (`qweight`, `qzeros`, `scales`, `g_idx`) with their configs,
  the integers from the seeded fill's raw bits, `g_idx` as GPTQ without act-order writes it.
  Their shapes and names are real; their values are not a quantization of anything.

A linear's stored tensors are made together; the last two linears' results are remembered,
so a `.bin` shard (state-dict order: a weight then its state) quantizes each linear once and a
safetensors shard (grouped by dtype width) at most once per group.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from ..checkpoint.quantized import UNQUANTIZED_MODULES, Scheme, layout_problem, stored_layout
from .layout import TensorInfo
from .specs import CheckpointSpec, ModelSpec, SpecError

# What transformers writes in `llm_int8_skip_modules` when the harness loader quantizes a LLaVA.
SKIP_MODULES = list(UNQUANTIZED_MODULES)
_QUANTIZED_SUFFIX = "_proj.weight"      # the seven decoder linears of a Llama/Mistral layer


def scheme_of_spec(ck: CheckpointSpec) -> Scheme | None:
    q = ck.quantization
    if q is None:
        return None
    if q in ("gptq", "awq"):
        return Scheme(q, q, ck.quant_bits, group_size=ck.quant_group_size)
    if q == "int8":
        return Scheme("bnb-int8", "bitsandbytes", 8)
    qtype = q.split("-")[0]
    return Scheme(f"bnb-{q}", "bitsandbytes", 4, qtype, q.endswith("-dq"))


@dataclass(frozen=True)
class QuantTensorInfo(TensorInfo):
    """One stored tensor of a quantized linear: which float weight it derives from and how."""

    weight: TensorInfo
    suffix: str
    scheme: Scheme


def _is_quantized(info: TensorInfo) -> bool:
    return info.group == "lm" and info.key.startswith("model.layers.") and \
        info.key.endswith(_QUANTIZED_SUFFIX)


def quantized_tensors(tensors: list[TensorInfo], ck: CheckpointSpec, model: ModelSpec
                      ) -> list[TensorInfo]:
    """The layout with every decoder linear replaced by its stored tensors (in the order
    transformers saves them); everything else unchanged."""
    scheme = scheme_of_spec(ck)
    if scheme is None:
        return tensors
    out = []
    for info in tensors:
        if not _is_quantized(info):
            out.append(info)
            continue
        out_f, in_f = info.shape
        problem = layout_problem(scheme, out_f, in_f)
        if problem:
            raise SpecError(f"CheckpointSpec.quantization={ck.quantization!r}: {info.key}: "
                            f"{problem}")
        module = info.key.removesuffix(".weight")
        for suffix, (shape, dtype) in stored_layout(scheme, out_f, in_f, info.dtype).items():
            if shape is None:  # the quant_state JSON: its length is its content's
                shape = (len(_bnb_state(ck.seed, info, scheme, model)),)
            out.append(QuantTensorInfo(f"{module}.{suffix}", shape, dtype, "quant", "lm",
                                       info, suffix, scheme))
    return out


def quantization_config(ck: CheckpointSpec, model: ModelSpec) -> dict | None:
    """config.json's `quantization_config`, as transformers' save_pretrained writes it."""
    scheme = scheme_of_spec(ck)
    if scheme is None:
        return None
    if scheme.method == "gptq":
        return {"quant_method": "gptq", "bits": scheme.bits, "group_size": scheme.group_size,
                "desc_act": False, "sym": True, "damp_percent": 0.01, "true_sequential": True,
                "static_groups": False, "model_name_or_path": None,
                "model_file_base_name": "model"}
    if scheme.method == "awq":
        return {"quant_method": "awq", "bits": scheme.bits, "group_size": scheme.group_size,
                "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    import torch  # heavy: torch
    from transformers import BitsAndBytesConfig  # heavy: transformers

    compute = getattr(torch, model.dtype)
    if scheme.bits == 8:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP_MODULES)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute,
                                    bnb_4bit_quant_type=scheme.quant_type,
                                    bnb_4bit_use_double_quant=scheme.double_quant,
                                    llm_int8_skip_modules=SKIP_MODULES)
    data = config.to_dict()
    if scheme.bits == 8:
        # transformers records the compute dtype the model was loaded in, 8-bit or not.
        data["bnb_4bit_compute_dtype"] = model.dtype
    return data


# --- bytes ------------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def _quantized(seed: int, weight: TensorInfo, scheme: Scheme, model: ModelSpec
               ) -> dict[str, bytes]:
    """suffix -> bytes of every stored tensor of one linear."""
    if scheme.method in ("gptq", "awq"):
        return _packed_integers(seed, weight, scheme)
    return _bitsandbytes(seed, weight, scheme, model)


def _as_bytes(tensor) -> bytes:
    import torch  # heavy: torch

    return tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _bitsandbytes(seed: int, weight: TensorInfo, scheme: Scheme, model: ModelSpec
                  ) -> dict[str, bytes]:
    import bitsandbytes.functional as F  # heavy: bitsandbytes
    import torch  # heavy: torch

    from .fill import make_tensor  # heavy: torch (fill); planning stays without it

    w = make_tensor(seed, weight, model)
    if scheme.bits == 8:
        # bitsandbytes' Int8Params._quantize, as transformers' load runs it: the weight cast
        # to float16 first, then row-wise absmax quantization, threshold 0.
        cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
        return {"weight": _as_bytes(cb), "SCB": _as_bytes(scb),
                "weight_format": _as_bytes(torch.zeros((), dtype=torch.uint8))}
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=scheme.double_quant,
                                    quant_type=scheme.quant_type, quant_storage=torch.uint8)
    out = {"weight": _as_bytes(packed)}
    out.update({f"weight.{k}": _as_bytes(v) for k, v in state.as_dict(packed=True).items()})
    return out


@lru_cache(maxsize=None)
def _bnb_state(seed: int, weight: TensorInfo, scheme: Scheme, model: ModelSpec) -> bytes:
    """The quant_state JSON as bitsandbytes packs it (`QuantState.as_dict(packed=True)`: the
    non-tensor fields in their order, `json.dumps`), made without quantizing so that a plan
    costs no quantization: only double quant's offset (the mean block absmax) reads the
    weight. The build writes bitsandbytes' own JSON; `stored_bytes` holds the two equal."""
    state = {"quant_type": scheme.quant_type, "blocksize": 64, "dtype": weight.dtype,
             "shape": list(weight.shape)}
    if scheme.double_quant:
        state |= {"nested_blocksize": 256, "nested_dtype": "float32",
                  "nested_offset": _mean_absmax(seed, weight, model)}
    return json.dumps(state).encode()


def _mean_absmax(seed: int, weight: TensorInfo, model: ModelSpec) -> float:
    """bitsandbytes' double-quant offset: the mean of the float32 block absmax values, each
    computed as its quantize_4bit computes it (a last, partial block on its own)."""
    from .fill import make_tensor  # heavy: torch (fill); planning stays without it

    flat = make_tensor(seed, weight, model).reshape(-1).float()
    full = flat.numel() - flat.numel() % 64
    absmax = flat[:full].reshape(-1, 64).abs().max(dim=-1)[0]
    if full < flat.numel():
        import torch  # heavy: torch

        absmax = torch.cat([absmax, flat[full:].abs().max().clamp(min=1e-38).unsqueeze(0)])
    return absmax.mean().item()


def _packed_integers(seed: int, weight: TensorInfo, scheme: Scheme) -> dict[str, bytes]:
    import torch  # heavy: torch

    from .fill import RAW_BITS, tensor_bytes  # heavy: torch, as above

    out_f, in_f = weight.shape
    out = {}
    for suffix, (shape, dtype) in stored_layout(scheme, out_f, in_f, weight.dtype).items():
        kind = "scale" if dtype == "float16" else RAW_BITS
        info = TensorInfo(f"{weight.key}:{suffix}", shape, dtype, kind, "lm")
        out[suffix] = tensor_bytes(seed, info, None)
    if scheme.method == "gptq":
        # GPTQ without act-order: input feature i belongs to group i // group_size.
        g_idx = torch.arange(in_f, dtype=torch.int32) // scheme.group_size
        out["g_idx"] = _as_bytes(g_idx)
    return out


def stored_bytes(seed: int, info: QuantTensorInfo, model: ModelSpec) -> bytes:
    data = _quantized(seed, info.weight, info.scheme, model)[info.suffix]
    if len(data) != info.nbytes:
        raise ValueError(f"{info.key}: made {len(data)} bytes, the plan says {info.nbytes}")
    return data
