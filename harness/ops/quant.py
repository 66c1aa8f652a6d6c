"""Quantization modes and what each one should cost in memory, from first principles.

A mode is a storage choice for the language model's linear layers: plain float (fp32, fp16,
bf16) or a bitsandbytes format (LLM.int8, NF4, NF4 with double quant, FP4). Everything else
stays in the load dtype, whatever the mode: embeddings, lm_head and the projector (named in
`llm_int8_skip_modules` by the loader), the norms (not linear layers) and the vision tower
(loaded separately, never quantized).

Bytes per quantized linear weight of n = out x in elements, as bitsandbytes 0.50 stores them:

  int8     n int8 values + one float32 scale per output row (SCB)          8 + 32/in bits
  nf4/fp4  n/2 bytes (two 4-bit codes a byte) + one float32 absmax per block of 64 values,
           + the 16-entry float32 code book of the layer                  4 + 32/64 = 4.5
  nf4-dq   the block absmax itself quantized to 8 bits in blocks of 256, with a float32
           second-level absmax per 256 blocks, one float32 offset (the mean absmax) and
           the layer's own copy of the 8-bit code book (256 float32)    4 + 8/64 + 32/16384
                                                                          = 4.127 bits

The formula counts shapes only (from a model skeleton on the meta device), so it is independent
of the load it is compared with; `measured_footprint` counts what a loaded model really holds,
quantization state included (transformers' `get_memory_footprint` misses it). Both describe
the model as loaded: on CPUs with AVX512-BF16, bitsandbytes 0.50 repacks 4-bit weights at the
first forward (absmax to bfloat16, double quant undone: 4 + 16/64 = 4.25 bits), which the
benchmark reports separately as the footprint after generation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.reader import as_tensor
from ..errors import HarnessError
from ..llava.keys import IMAGE_NEWLINE, PROJECTOR_PREFIX, VISION_TOWER_PREFIX
from ..model.config import llava_config

NF4_BLOCK = 64          # values per first-level absmax (bitsandbytes' default blocksize)
DQ_BLOCK = 256          # first-level absmax values per second-level absmax
CODE_4BIT_BYTES = 16 * 4       # each 4-bit layer's own float32 code book
# The 8-bit dynamic map double quant uses: bitsandbytes 0.50 gives each layer its own copy
# (`code.to(device, copy=True)` in quantize_blockwise).
DYNAMIC_MAP_BYTES = 256 * 4
FLOAT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class QuantError(HarnessError):
    pass


@dataclass(frozen=True)
class Mode:
    name: str
    dtype: str | None = None         # storage dtype of a float mode; None: the compute dtype
    bits: int | None = None          # 8 or 4 for bitsandbytes modes
    quant_type: str | None = None    # "nf4" / "fp4" for 4-bit
    double_quant: bool = False

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def load_dtype(self, compute_dtype: str = "float16") -> str:
        """The dtype everything unquantized is loaded in (and 4-bit layers compute in)."""
        return self.dtype or compute_dtype


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("fp32", dtype="float32"),
    Mode("fp16", dtype="float16"),
    Mode("bf16", dtype="bfloat16"),
    Mode("int8", bits=8),
    Mode("nf4", bits=4, quant_type="nf4"),
    Mode("nf4-dq", bits=4, quant_type="nf4", double_quant=True),
    Mode("fp4", bits=4, quant_type="fp4"),
)}
MODE_NAMES = tuple(MODES)


def mode(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise QuantError(f"mode {name!r}: expected one of {', '.join(MODE_NAMES)}") from None


def parse_modes(text: str) -> tuple[str, ...]:
    """'fp16,nf4-dq' -> ('fp16', 'nf4-dq'); unknown or repeated names are an error."""
    names = tuple(part.strip() for part in text.split(","))
    for name in names:
        mode(name)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise QuantError(f"mode {repeated[0]!r} given twice in {text!r}")
    return names


def bnb_config(name: str, compute_dtype: str = "float16"):
    """The BitsAndBytesConfig of a quantized mode (None for a float mode), with the loader's
    own skip list, so the projector and lm_head stay unquantized in every mode."""
    m = mode(name)
    if not m.quantized:
        return None
    import torch  # heavy: torch
    from transformers import BitsAndBytesConfig  # heavy: transformers

    from .load import quantization_config  # heavy: torch, transformers

    compute = getattr(torch, compute_dtype)
    base = quantization_config(m.bits == 8, m.bits == 4, compute)
    if m.bits == 8:
        return base
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_quant_type=m.quant_type,
                              bnb_4bit_use_double_quant=m.double_quant,
                              llm_int8_skip_modules=list(base.llm_int8_skip_modules))


# --- the formula ----------------------------------------------------------------------------

@dataclass(frozen=True)
class LinearBytes:
    weight: int   # the stored weight values (packed codes for 4-bit)
    state: int    # scales, absmax, offsets and code books that belong to this layer alone


def linear_bytes(name: str, out_features: int, in_features: int,
                 float_dtype: str = "float16") -> LinearBytes:
    """Bytes one linear layer's weight takes in a mode (bias excluded: it stays float)."""
    m = mode(name)
    n = out_features * in_features
    if not m.quantized:
        return LinearBytes(n * FLOAT_BYTES[m.load_dtype(float_dtype)], 0)
    if m.bits == 8:
        return LinearBytes(n, out_features * 4)
    blocks = math.ceil(n / NF4_BLOCK)
    if not m.double_quant:
        return LinearBytes(math.ceil(n / 2), blocks * 4 + CODE_4BIT_BYTES)
    second = math.ceil(blocks / DQ_BLOCK)
    return LinearBytes(math.ceil(n / 2),
                       blocks + second * 4 + 4 + CODE_4BIT_BYTES + DYNAMIC_MAP_BYTES)


@dataclass(frozen=True)
class ModelParts:
    """Shapes and element counts of a LLaVA model, by what bitsandbytes does with them."""

    linears: tuple[tuple[int, int], ...]   # (out, in) of every linear bitsandbytes replaces
    unquantized: dict[str, int] = field(default_factory=dict)  # part -> elements, load dtype
    buffer_bytes: int = 0                  # rotary inv_freq, CLIP position ids (native dtype)

    @property
    def quantizable_params(self) -> int:
        return sum(o * i for o, i in self.linears)

    @property
    def num_parameters(self) -> int:
        """All parameters, as the unquantized model counts them."""
        return self.quantizable_params + sum(self.unquantized.values())


@dataclass(frozen=True)
class Footprint:
    mode: str
    dtype: str
    quantized_params: int
    weight_bytes: int        # the replaced linears' weights
    state_bytes: int         # their quantization state
    unquantized_bytes: dict[str, int]
    buffer_bytes: int

    @property
    def total(self) -> int:
        return (self.weight_bytes + self.state_bytes + sum(self.unquantized_bytes.values())
                + self.buffer_bytes)

    @property
    def bits_per_param(self) -> float:
        """Bits per weight of the replaced linears, quantization state included."""
        if not self.quantized_params:
            return 0.0
        return (self.weight_bytes + self.state_bytes) * 8 / self.quantized_params


def theoretical_footprint(name: str, parts: ModelParts,
                          compute_dtype: str = "float16") -> Footprint:
    """What a model of `parts` should hold in mode `name`, byte for byte."""
    m = mode(name)
    dtype = m.load_dtype(compute_dtype)
    per_layer = [linear_bytes(name, o, i, dtype) for o, i in parts.linears]
    item = FLOAT_BYTES[dtype]
    return Footprint(
        mode=name, dtype=dtype, quantized_params=parts.quantizable_params,
        weight_bytes=sum(b.weight for b in per_layer),
        state_bytes=sum(b.state for b in per_layer),
        unquantized_bytes={part: n * item for part, n in parts.unquantized.items()},
        buffer_bytes=parts.buffer_bytes)


# --- shapes from a model skeleton -----------------------------------------------------------

def _part_of(name: str, module) -> str:
    """Which part a parameter (full name, owning module) belongs to. The loader keeps
    lm_head and the projector out of quantization by name; the tower is loaded apart."""
    if name.startswith("lm_head"):
        return "lm_head"
    if name.startswith((PROJECTOR_PREFIX, IMAGE_NEWLINE)):
        return "projector"
    if name.startswith(VISION_TOWER_PREFIX):
        return "vision_tower"
    kind = type(module).__name__
    if kind == "Embedding":
        return "embeddings"
    if kind.endswith("Norm"):
        return "norms"
    return "other"


def parts_of_model(llava, tower=None) -> ModelParts:
    """Parts of a LLaVA model (real or on the meta device) and, when given separately, its
    CLIP vision tower (a tower attached to the model is found there). Every nn.Linear outside
    lm_head, the projector and the tower is one bitsandbytes replaces."""
    from torch import nn  # heavy: torch

    linears, counts = [], {}
    for name, module in llava.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            part = _part_of(f"{name}.{pname}" if name else pname, module)
            if isinstance(module, nn.Linear) and part == "other":
                if pname == "weight":
                    linears.append((module.out_features, module.in_features))
                    continue
                part = "linear_biases"
            counts[part] = counts.get(part, 0) + param.numel()
    buffers = sum(b.numel() * b.element_size() for b in llava.buffers())
    if tower is not None:
        counts["vision_tower"] = counts.get("vision_tower", 0) + sum(
            p.numel() for p in tower.parameters())
        buffers += sum(b.numel() * b.element_size() for b in tower.buffers())
    return ModelParts(tuple(linears), dict(sorted(counts.items())), buffers)


def _parts_on_meta(arch: str, config, tower_config) -> ModelParts:
    import torch  # heavy: torch
    from transformers import CLIPVisionModel  # heavy: transformers

    from ..model.llava import MODEL_CLASSES  # heavy: torch, transformers

    with torch.device("meta"):
        model = MODEL_CLASSES[arch](config)
        tower = CLIPVisionModel(tower_config)
    return parts_of_model(model, tower)


def parts_from_folder(folder: Path, vision_tower: Path | None = None) -> ModelParts:
    """Parts of the LLaVA model in `folder` built on the meta device from config.json and the
    vision tower's config: no weight is read, so this costs the same for a 7B as for tiny."""
    from transformers import CLIPVisionConfig  # heavy: transformers

    arch, config = llava_config(Path(folder))
    tower_dir = Path(vision_tower or getattr(config, "mm_vision_tower", "") or "")
    if not (tower_dir / "config.json").is_file():
        raise QuantError(f"{folder}: vision tower folder {str(tower_dir)!r} (mm_vision_tower) "
                         "not found; pass a local CLIP folder")
    return _parts_on_meta(arch, config, CLIPVisionConfig.from_pretrained(tower_dir))


def parts_from_config(data: dict, tower_config) -> ModelParts:
    """Parts of the model a LLaVA config.json (as a dict) and a CLIP tower config describe."""
    arch, config = llava_config(Path(str(data.get("_name_or_path") or "config")), data)
    return _parts_on_meta(arch, config, tower_config)


# --- what a loaded model holds --------------------------------------------------------------

def _quant_state_tensors(param) -> list:
    """Tensors bitsandbytes keeps beside a quantized weight."""
    out = []
    state = getattr(param, "quant_state", None)
    while state is not None:
        out += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if
                t is not None]
        state = getattr(state, "state2", None)
    out += [t for t in (getattr(param, "SCB", None), getattr(param, "CB", None))
            if t is not None]
    return out


def model_tensors(model) -> list:
    """Every tensor a model holds: parameters, buffers and quantization state, including
    LLM.int8's row scales, which move from the weight to the layer's `state` on the first
    forward."""
    tensors = []
    for param in model.parameters():
        tensors.append(param)
        tensors += _quant_state_tensors(param)
    for module in model.modules():
        state = getattr(module, "state", None)
        tensors += [t for t in (getattr(state, "CB", None), getattr(state, "SCB", None))
                    if t is not None and hasattr(t, "data_ptr")]
    tensors += list(model.buffers())
    return tensors


def measured_footprint(model) -> int:
    """Bytes of every distinct tensor storage the model holds (shared ones counted once)."""
    seen: dict[tuple, int] = {}
    for t in model_tensors(model):
        if t.device.type == "meta":
            continue
        key = (str(t.device), t.data_ptr())
        seen[key] = max(seen.get(key, 0), t.numel() * t.element_size())
    return sum(seen.values())


# --- reading a stored quantized linear back -------------------------------------------------

def dequantized(linear, scheme) -> "torch.Tensor":  # noqa: F821 (torch is imported lazily)
    """The float32 weight a stored bitsandbytes linear (checkpoint.quantized.QuantizedLinear)
    stands for, as bitsandbytes dequantizes it: 4-bit through its QuantState (double quant
    included), LLM.int8 as CB * SCB / 127 row by row."""
    import torch  # heavy: torch

    stored = {suffix: as_tensor(source, {}) for suffix, source in linear.tensors.items()}
    if scheme.method != "bitsandbytes":
        raise QuantError(f"{linear.module}: {scheme.name} weights are not dequantized here "
                         "(they need their own kernels)")
    if scheme.bits == 8:
        return stored["weight"].float() * stored["SCB"].float().unsqueeze(1) / 127.0
    import bitsandbytes.functional as F  # heavy: bitsandbytes

    state = F.QuantState.from_dict({k.removeprefix("weight."): v.clone()
                                    for k, v in stored.items() if k != "weight"},
                                   device=torch.device("cpu"))
    return F.dequantize_4bit(stored["weight"].clone(), state).float().reshape(linear.shape)


def cpu_4bit_problem(linears: Iterable[tuple[int, int]]) -> str | None:
    """Why bitsandbytes cannot run these (out_features, in_features) layers in 4 bits on this
    CPU, or None. bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks 4-bit weights on the
    first forward in blocks of 32 output rows: a layer whose out_features is not a multiple of
    32 fails there (an assertion deep inside). Say so up front instead."""
    from bitsandbytes.functional import has_avx512bf16  # heavy: bitsandbytes

    if not has_avx512bf16():
        return None
    bad = next(((o, i) for o, i in linears if o % 32 or i % 2), None)
    if bad is None:
        return None
    return (f"bitsandbytes' CPU 4-bit kernel (AVX512-BF16 path) needs out_features divisible "
            f"by 32 and even in_features; a layer is {bad[0]} x {bad[1]}")
