"""Pre-quantized checkpoints: which tensors a quantized linear layer is stored as, per scheme.

A quantized linear is no longer one `weight` tensor: bitsandbytes 4-bit stores the packed codes
in `weight` (uint8, two codes a byte, shape [ceil(n/2), 1]) beside `weight.absmax`,
`weight.quant_map`, with double quant `weight.nested_absmax` / `weight.nested_quant_map`, and a
`weight.quant_state.bitsandbytes__<type>` tensor of UTF-8 JSON holding the logical shape;
LLM.int8 stores `weight` (int8) with `SCB` (row scales) and `weight_format`; GPTQ and AWQ store
`qweight` / `qzeros` / `scales` (and GPTQ `g_idx`) in place of `weight`. The scheme comes from
config.json's `quantization_config`, as transformers reads it.

This module is the one place that knows those layouts: the builder writes them, and count,
strip and the checks read them back into logical linears (the unquantized `weight` each one
stands for), validating every stored shape against the logical shape it implies. Every problem
is one CheckpointError line naming the file, the key and what was expected.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .problems import CheckpointError, shown
from .tensors import Source, piece_chunks

BNB_4BIT_TYPES = ("nf4", "fp4")
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = ("float16", "bfloat16", "float32")
PACKED_BITS = (2, 4, 8)          # GPTQ / AWQ bit widths that pack evenly into int32
MAX_STATE_JSON = 4096            # a real quant_state JSON is ~170 bytes
# `llm_int8_skip_modules` of a quantized LLaVA: the projector and lm_head stay float (the vision
# tower is loaded apart and never quantized). transformers 5 matches these from the start of
# the module name or as a suffix (4.x: as a substring), so the projector is named in full.
UNQUANTIZED_MODULES = ("model.mm_projector", "mm_projector", "lm_head")


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme as config.json's `quantization_config` states it."""

    name: str                       # bnb-nf4, bnb-nf4-dq, bnb-fp4, bnb-int8, gptq, awq
    method: str                     # bitsandbytes, gptq, awq
    bits: int
    quant_type: str | None = None   # bitsandbytes 4-bit: nf4 / fp4
    double_quant: bool = False
    group_size: int | None = None   # gptq / awq

    @property
    def state_suffixes(self) -> tuple[str, ...]:
        """Stored names (after the module path) that only a quantized linear has."""
        if self.method == "bitsandbytes" and self.bits == 4:
            nested = ("weight.nested_absmax", "weight.nested_quant_map") if self.double_quant \
                else ()
            return ("weight.absmax", "weight.quant_map", *nested,
                    f"weight.quant_state.bitsandbytes__{self.quant_type}")
        if self.method == "bitsandbytes":
            return ("SCB", "weight_format")
        if self.method == "gptq":
            return ("qweight", "qzeros", "scales", "g_idx")
        return ("qweight", "qzeros", "scales")

    @property
    def suffixes(self) -> tuple[str, ...]:
        """Every stored name of one quantized linear, in the order transformers saves them."""
        if self.method == "bitsandbytes":
            return ("weight", *self.state_suffixes)
        return self.state_suffixes

    @property
    def packed_dtype(self) -> str:
        """The dtype of the stored weight (`weight` or `qweight`)."""
        if self.method == "bitsandbytes":
            return "uint8" if self.bits == 4 else "int8"
        return "int32"


def _bnb_scheme(qc: dict, where: str) -> Scheme:
    if qc.get("load_in_8bit"):
        return Scheme("bnb-int8", "bitsandbytes", 8)
    if not qc.get("load_in_4bit"):
        raise CheckpointError(f"{where}: quantization_config (bitsandbytes) sets neither "
                              "load_in_4bit nor load_in_8bit")
    qtype = qc.get("bnb_4bit_quant_type", "fp4")
    if qtype not in BNB_4BIT_TYPES:
        raise CheckpointError(f"{where}: quantization_config.bnb_4bit_quant_type "
                              f"{shown(repr(qtype))} is not one of {', '.join(BNB_4BIT_TYPES)}")
    dq = bool(qc.get("bnb_4bit_use_double_quant"))
    return Scheme(f"bnb-{qtype}{'-dq' if dq else ''}", "bitsandbytes", 4, qtype, dq)


def _packed_scheme(method: str, qc: dict, where: str) -> Scheme:
    bits, group = qc.get("bits"), qc.get("group_size")
    if bits not in PACKED_BITS:
        raise CheckpointError(f"{where}: quantization_config.bits {shown(repr(bits))}: the "
                              f"{method} layouts this harness reads pack {PACKED_BITS} bits")
    if not isinstance(group, int) or isinstance(group, bool) or group <= 0:
        raise CheckpointError(f"{where}: quantization_config.group_size "
                              f"{shown(repr(group))} is not a positive integer (-1, one group "
                              "per column, is not supported)")
    return Scheme(method, method, bits, group_size=group)


def scheme_of(config: dict, where: Path | str) -> Scheme | None:
    """The scheme config.json's `quantization_config` names, or None for a float checkpoint."""
    where = shown(where)
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config is not an object")
    method = qc.get("quant_method")
    if method == "bitsandbytes":
        return _bnb_scheme(qc, where)
    if method in ("gptq", "awq"):
        return _packed_scheme(method, qc, where)
    raise CheckpointError(f"{where}: quantization_config.quant_method {shown(repr(method))} "
                          "is not one of bitsandbytes, gptq, awq")


# --- stored layout of one linear -----------------------------------------------------------

def stored_layout(scheme: Scheme, out_features: int, in_features: int, dtype: str
                  ) -> dict[str, tuple[tuple[int, ...] | None, str]]:
    """suffix -> (shape, dtype) of every tensor a quantized (out x in) linear is stored as;
    `dtype` is the model's float dtype. A shape of None (the quant_state JSON) is any 1-D."""
    n = out_features * in_features
    if scheme.method == "bitsandbytes" and scheme.bits == 8:
        return {"weight": ((out_features, in_features), "int8"),
                "SCB": ((out_features,), "float32"), "weight_format": ((), "uint8")}
    if scheme.method == "bitsandbytes":
        blocks = math.ceil(n / 64)
        out = {"weight": ((math.ceil(n / 2), 1), "uint8"),
               "weight.absmax": ((blocks,), "uint8" if scheme.double_quant else "float32"),
               "weight.quant_map": ((16,), "float32")}
        if scheme.double_quant:
            out["weight.nested_absmax"] = ((math.ceil(blocks / 256),), "float32")
            out["weight.nested_quant_map"] = ((256,), "float32")
        out[scheme.state_suffixes[-1]] = (None, "uint8")
        return out
    pack = 32 // scheme.bits
    groups = math.ceil(in_features / scheme.group_size)
    if scheme.method == "gptq":
        return {"qweight": ((in_features // pack, out_features), "int32"),
                "qzeros": ((groups, out_features // pack), "int32"),
                "scales": ((groups, out_features), "float16"),
                "g_idx": ((in_features,), "int32")}
    return {"qweight": ((in_features, out_features // pack), "int32"),
            "qzeros": ((groups, out_features // pack), "int32"),
            "scales": ((groups, out_features), "float16")}


def layout_problem(scheme: Scheme, out_features: int, in_features: int) -> str | None:
    """Why an (out x in) linear cannot be stored in this scheme, or None."""
    if scheme.method in ("gptq", "awq"):
        pack = 32 // scheme.bits
        if in_features % scheme.group_size:
            return f"in_features {in_features} is not a multiple of group_size " \
                   f"{scheme.group_size}"
        if in_features % pack or out_features % pack:
            return f"{out_features} x {in_features} does not pack {pack} values per int32"
    return None


# --- reading stored linears back -------------------------------------------------------------

@dataclass(frozen=True)
class QuantizedLinear:
    """One quantized linear as stored: its module path, logical shape and stored tensors."""

    module: str
    shape: tuple[int, int]                  # (out_features, in_features) of the float weight
    tensors: dict[str, Source]              # suffix -> stored tensor
    state: dict | None = None               # bitsandbytes 4-bit: the decoded quant_state JSON

    @property
    def stored_bytes(self) -> int:
        return sum(s.nbytes for s in self.tensors.values())

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed weight alone (the rest is quantization state)."""
        main = "weight" if "weight" in self.tensors else "qweight"
        return self.tensors[main].nbytes


def split_key(scheme: Scheme, key: str) -> tuple[str, str] | None:
    """(module, suffix) when `key` is one of a quantized linear's stored names."""
    for suffix in sorted(scheme.suffixes, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], suffix
    return None


def _where(source: Source, folder: Path | None) -> str:
    return shown(folder / source.file if folder is not None and source.file else
                 source.file or "checkpoint")


def _is_quantized(scheme: Scheme, key: str, source: Source) -> str | None:
    """The module path when `key` marks a quantized linear: a state tensor, or a stored
    weight in the packed dtype (a packed weight whose state is missing must not pass)."""
    split = split_key(scheme, key)
    if split is None:
        return None
    module, suffix = split
    if suffix != "weight" or source.dtype == scheme.packed_dtype:
        return module
    return None


def read_state_json(source: Source, where: str) -> dict:
    """A bitsandbytes `quant_state.bitsandbytes__*` tensor: UTF-8 JSON of the non-tensor state."""
    if source.dtype != "uint8" or len(source.shape) != 1 or source.nbytes > MAX_STATE_JSON:
        raise CheckpointError(f"{where}: {shown(source.key)} is {source.dtype}"
                              f"{list(source.shape)}, expected a uint8 vector of at most "
                              f"{MAX_STATE_JSON} bytes (bitsandbytes' packed quant state)")
    raw = b"".join(chunk for piece in source.contiguous().pieces for chunk in piece_chunks(piece))
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{where}: {shown(source.key)} is not UTF-8 JSON (bitsandbytes' "
                              "packed quant state)") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: {shown(source.key)} holds JSON that is not an object")
    return state


def _check_state(scheme: Scheme, state: dict, key: str, where: str) -> tuple[int, int]:
    """The logical (out, in) shape from a 4-bit quant state, every field checked."""
    def bad(field: str, expected: str):
        raise CheckpointError(f"{where}: {shown(key)}: {field} is "
                              f"{shown(repr(state.get(field)))}, expected {expected}")

    if state.get("quant_type") not in BNB_4BIT_TYPES:
        bad("quant_type", f"one of {', '.join(BNB_4BIT_TYPES)}")
    if state["quant_type"] != scheme.quant_type:
        bad("quant_type", f"{scheme.quant_type!r} as quantization_config says")
    if state.get("blocksize") != 64:
        bad("blocksize", "64 (bitsandbytes' default, the one transformers writes)")
    if state.get("dtype") not in FLOAT_DTYPES:
        bad("dtype", f"one of {', '.join(FLOAT_DTYPES)}")
    shape = state.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        bad("shape", "[out_features, in_features]")
    if scheme.double_quant:
        if state.get("nested_blocksize") != 256:
            bad("nested_blocksize", "256")
        if not isinstance(state.get("nested_offset"), (int, float)):
            bad("nested_offset", "a number")
    elif "nested_blocksize" in state:
        bad("nested_blocksize", "absent (quantization_config has no double quant)")
    return shape[0], shape[1]


def _logical_shape(scheme: Scheme, module: str, tensors: dict[str, Source], where: str
                   ) -> tuple[tuple[int, int], dict | None]:
    main = "weight" if scheme.method == "bitsandbytes" else "qweight"
    if main not in tensors:
        raise CheckpointError(f"{where}: {shown(module)} has quantization state but no "
                              f"{main}")
    shape = tensors[main].shape
    if scheme.method == "bitsandbytes" and scheme.bits == 4:
        key = f"{module}.{scheme.state_suffixes[-1]}"
        if scheme.state_suffixes[-1] not in tensors:
            raise CheckpointError(f"{where}: {shown(module + '.weight')} is a packed 4-bit "
                                  f"weight but its quant state {shown(key)} is missing")
        state = read_state_json(tensors[scheme.state_suffixes[-1]], where)
        return _check_state(scheme, state, key, where), state
    if len(shape) != 2:
        raise CheckpointError(f"{where}: {shown(module + '.' + main)} has shape {list(shape)}, "
                              "expected 2 dimensions")
    if scheme.method == "bitsandbytes":
        return (shape[0], shape[1]), None
    pack = 32 // scheme.bits
    if scheme.method == "gptq":
        return (shape[1], shape[0] * pack), None
    return (shape[1] * pack, shape[0]), None


def _check_linear(scheme: Scheme, module: str, tensors: dict[str, Source], where: str
                  ) -> QuantizedLinear:
    (out_f, in_f), state = _logical_shape(scheme, module, tensors, where)
    problem = layout_problem(scheme, out_f, in_f)
    if problem:
        raise CheckpointError(f"{where}: {shown(module)}: {problem}")
    dtype = state["dtype"] if state else "float16"
    layout = stored_layout(scheme, out_f, in_f, dtype)
    for suffix, (shape, want) in layout.items():
        key = f"{module}.{suffix}"
        got = tensors.get(suffix)
        if got is None:
            raise CheckpointError(f"{where}: {shown(module)} is quantized ({scheme.name}) but "
                                  f"{shown(key)} is missing")
        if got.dtype != want or (shape is not None and got.shape != shape):
            expect = f"{want}{list(shape)}" if shape is not None else want
            raise CheckpointError(f"{where}: {shown(key)} is {got.dtype}{list(got.shape)}, "
                                  f"expected {expect} for a {out_f} x {in_f} linear in "
                                  f"{scheme.name}")
    return QuantizedLinear(module, (out_f, in_f), dict(tensors), state)


def quantized_linears(scheme: Scheme, sources: dict[str, Source], folder: Path | None = None
                      ) -> dict[str, QuantizedLinear]:
    """Every quantized linear of a checkpoint (module path -> stored linear), each checked:
    all of its state present, every shape the one its logical shape implies."""
    grouped: dict[str, dict[str, Source]] = {}
    marked: set[str] = set()
    for key, source in sources.items():
        split = split_key(scheme, key)
        if split is None:
            continue
        grouped.setdefault(split[0], {})[split[1]] = source
        if _is_quantized(scheme, key, source):
            marked.add(split[0])
    out = {}
    for module in sorted(marked):
        tensors = grouped[module]
        where = _where(next(iter(tensors.values())), folder)
        out[module] = _check_linear(scheme, module, tensors, where)
    return out


def stored_keys(linears: dict[str, QuantizedLinear]) -> set[str]:
    return {f"{m}.{s}" for m, q in linears.items() for s in q.tensors}


def logical_shapes(sources: dict[str, Source], linears: dict[str, QuantizedLinear]
                   ) -> dict[str, tuple[int, ...]]:
    """key -> shape of the checkpoint as the unquantized model would store it."""
    stored = stored_keys(linears)
    shapes = {k: s.shape for k, s in sources.items() if k not in stored}
    shapes.update({f"{m}.weight": q.shape for m, q in linears.items()})
    return shapes
