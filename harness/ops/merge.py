"""Merging a LLaVA LoRA into its base checkpoint, streamed one tensor at a time.

What LLaVA's `scripts/merge_lora_weights.py` writes (the base with the adapter merged in and
the projector from `non_lora_trainables.bin`, plus config and tokenizer), without loading the
model: each base shard is opened lazily (mmap for `.bin`, `safe_open` for safetensors) and the
output is written shard by shard with the base's split, so memory stays near the largest tensor
rather than the model's 13.5 GB.

Per adapted linear `W' = W + s * B @ A` (s = alpha / r, alpha / sqrt(r) with rsLoRA, per-module
`rank_pattern` / `alpha_pattern` honoured); DoRA then rescales each row by
`m / ||W + s * B @ A||`. The arithmetic is peft's `merge_and_unload` op for op, so on CPU the
tensors are bit-identical to the loader's LoRA path: peft upcasts float16/bfloat16 adapter
weights to float32 on load, forms the update in float32 and adds it into the weight held in the
load dtype (one rounding). Biases the adapter trained (`bias="all"` / `"lora_only"`) replace the
base's. Every tensor that changed is checked for NaN/inf before anything is committed.

Every adapter tensor must find its target: an adapted module the base does not hold, a lone A
or B, an unknown tensor kind, or a rank that disagrees with the config is an error. Adapters on
the vision tower are dropped only when their update is exactly zero (B == 0: what LLaVA's
training leaves, since the tower runs under no_grad); any other change to the tower is an error,
because a LLaVA checkpoint re-reads its tower from `mm_vision_tower` and cannot carry it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import queue
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import torch

from ..checkpoint.atomic import atomic_dir, check_target
from ..checkpoint.files import copy_files
from ..checkpoint.formats import Tensor, index_json, index_of
from ..checkpoint.paths import check_output, inside
from ..checkpoint.reader import as_tensor, open_folder, read_file
from ..checkpoint.shards import new_shard_order, write_shard
from ..errors import HarnessError
from ..llava.adapter import NON_LORA_TRAINABLES, LoraModule, empty_adapter
from ..llava.claims import check_folder_claims
from ..llava.config import uses_image_newline
from ..llava.keys import IMAGE_NEWLINE, PROJECTOR_PREFIX
from ..llava.kinds import LM_SIDE_FILES
from ..llava.tensors import check_config_fits
from ..model.config import read_config_json
from ..model.projector import build_projector, projector_type_of_config
from .adapter import AdapterConfig, AdapterWeights, classify

# Files of the base a merged folder keeps (LLaVA's script saves the base's tokenizer).
AUX_FILES = LM_SIDE_FILES
OUT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in OUT_DTYPES.items()}


class MergeError(HarnessError):
    pass


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in `t`. A float32 sum is finite only if every element is (NaN and inf
    propagate), and costs a third of `isfinite(t).all()`; the full check runs only to confirm
    a non-finite sum, which huge finite values could also overflow to."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def upcast(t: torch.Tensor) -> torch.Tensor:
    """peft's autocast_adapter_dtype: half-precision adapter tensors compute in float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# Rows of the update finished at a time: 64 float32 rows of 4096 (1 MiB) stay in the cache
# through the scaling, the addition and the rounding, instead of three passes over memory.
_ROWS = 64


class Workspace:
    """Buffers reused from one merged weight to the next. A fresh tensor of a 7B's MLP size
    (180 MB) pays its page faults again each time, since the allocator hands blocks that big
    back to the system: that, and a mixed-dtype addition, were more than half of a weight's
    merge time. A weight merged into a workspace lives in it until the next one."""

    def __init__(self):
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = self._buffers[(name, dtype)] = torch.empty(n, dtype=dtype)
        return buf[:n]


def _merge_into(ws: Workspace, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """`merge_weight`'s plain LoRA arithmetic, element for element the same operations (so bit
    for bit the same result), in the workspace's buffers and a cache-sized block of rows at a
    time."""
    rows, cols = w.shape
    delta = ws.take("delta", rows * cols, torch.float32).view(rows, cols)
    torch.matmul(b, a, out=delta)
    out = ws.take("out", rows * cols, w.dtype).view(rows, cols)
    wide = ws.take("weight", _ROWS * cols, torch.float32)
    for r in range(0, rows, _ROWS):
        d = delta[r:r + _ROWS].mul_(scaling)
        w32 = wide[:d.numel()].view(d.shape)
        w32.copy_(w[r:r + _ROWS])
        out[r:r + _ROWS].copy_(d.add_(w32))
    return out


def merge_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, *,
                 magnitude: torch.Tensor | None = None, fan_in_fan_out: bool = False,
                 device: str = "cpu", workspace: Workspace | None = None) -> torch.Tensor:
    """peft's `Linear.merge` for one adapter, op for op; `weight` (already in the output dtype)
    is not modified. Returns the merged weight on the CPU (in `workspace` when given, for a
    plain LoRA on a CPU: valid until its next use)."""
    if (workspace is not None and device == "cpu" and magnitude is None
            and not fan_in_fan_out and weight.dim() == a.dim() == b.dim() == 2):
        return _merge_into(workspace, weight, upcast(a), upcast(b), scaling)
    dtype = weight.dtype
    w = weight.to(device)
    a, b = upcast(a).to(device), upcast(b).to(device)
    delta = b @ a
    delta = (delta.T if fan_in_fan_out else delta).mul_(scaling)
    if magnitude is None:
        # peft adds the float32 update into the weight in place (w += delta): computed in
        # float32, rounded once to the weight's dtype. The same values (addition commutes,
        # bit for bit), added into the update's own float32 buffer: no float32 copy of the
        # weight, 20% less time at 7B than copying it first.
        return delta.add_(w).to(dtype).cpu()
    magnitude = upcast(magnitude).to(device)
    rows = (w.T if fan_in_fan_out else w) + (delta.T if fan_in_fan_out else delta)
    norm = torch.linalg.norm(rows, dim=1)
    factor = (magnitude / norm).view(-1, 1)
    factor = factor.T if fan_in_fan_out else factor
    return (factor * (w + delta)).to(dtype).cpu()


@dataclass
class MergePlan:
    modules: dict[str, LoraModule]          # weight key -> its adapter tensors
    biases: dict[str, str]               # base key -> adapter key replacing it
    trainables: dict[str, torch.Tensor]  # base key -> tensor from non_lora_trainables.bin
    added: list[str]                     # keys the base lacks (a Vicuna base's projector)
    dropped: list[str] = field(default_factory=list)


@dataclass
class MergeResult:
    output: Path
    merged: int
    biases: int
    trainables: int
    tensors: int
    nbytes: int
    dtype: str
    dropped: list[str]
    work_s: float

    def summary(self) -> dict:
        return {"output": str(self.output), "merged_layers": self.merged,
                "biases_replaced": self.biases, "trainables_loaded": self.trainables,
                "tensors": self.tensors, "bytes": self.nbytes, "dtype": self.dtype,
                "dropped": self.dropped, "work_s": self.work_s}


def _multimodal_shapes(config: dict) -> dict[str, tuple]:
    """The projector (and image_newline) tensors a LLaVA config implies, with shapes."""
    if not config.get("mm_vision_tower"):
        return {}
    with torch.device("meta"):
        projector = build_projector(projector_type_of_config(SimpleNamespace(**config)),
                                    config["mm_hidden_size"], config["hidden_size"])
    shapes = {f"{PROJECTOR_PREFIX}{k}": tuple(v.shape) for k, v in projector.state_dict().items()}
    if uses_image_newline(config.get("mm_patch_merge_type")):
        shapes[IMAGE_NEWLINE] = (config["hidden_size"],)
    return shapes


def _trainables(adapter: Path, known: dict[str, tuple]) -> dict[str, torch.Tensor]:
    from .load import normalise_trainable_keys  # heavy: transformers

    file = inside(adapter, NON_LORA_TRAINABLES, must_exist=False)
    if file is None:
        return {}
    raw = {k.replace(".base_layer.", "."): v for k, v in read_file(file, "bin").items()}
    weights = normalise_trainable_keys(raw, set(known), file)
    for key, value in weights.items():
        if tuple(value.shape) != tuple(known[key]):
            raise MergeError(f"{file}: {key} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(known[key])}")
    return weights


def _check_target(weights: AdapterWeights, cfg: AdapterConfig, target: str, m: LoraModule,
                  shape: tuple | None) -> None:
    module = target.removesuffix(".weight")
    if shape is None:
        raise MergeError(f"{weights.path}: {m.a} adapts {module}, but the base checkpoint has "
                         f"no {target}")
    r, _ = cfg.rank_and_scaling(module)
    a, b = weights.get(m.a), weights.get(m.b)
    fan_out, fan_in = (shape[1], shape[0]) if cfg.fan_in_fan_out else shape
    if tuple(a.shape) != (r, fan_in) or tuple(b.shape) != (fan_out, r):
        raise MergeError(f"{weights.path}: {module}: lora_A {tuple(a.shape)} / lora_B "
                         f"{tuple(b.shape)} do not fit rank {r} and weight {tuple(shape)}")
    if cfg.dora != (m.magnitude is not None):
        raise MergeError(f"{weights.path}: {module}: use_dora={cfg.dora} but the DoRA magnitude "
                         f"is {'missing' if cfg.dora else 'present'}")


def _tower_modules(weights: AdapterWeights, modules: dict[str, LoraModule],
                   biases: dict[str, str]) -> list[str]:
    """Drop the vision tower's adapters if their update is exactly zero; else refuse."""
    dropped = []
    for target in [t for t in modules if "vision_tower" in t]:
        m = modules.pop(target)
        if torch.count_nonzero(weights.get(m.b)):
            raise MergeError(f"{weights.path}: {m.b} changes the vision tower; a LLaVA "
                             "checkpoint re-reads its tower from mm_vision_tower and cannot "
                             "carry it (exclude the tower from the LoRA targets)")
        dropped.append(f"{target.removesuffix('.weight')} (zero update)")
    for key in [k for k in biases if "vision_tower" in k]:
        raise MergeError(f"{weights.path}: {biases[key]} is a vision-tower bias; a LLaVA "
                         "checkpoint re-reads its tower from mm_vision_tower and cannot carry it")
    return dropped


def plan_merge(cfg: AdapterConfig, weights: AdapterWeights, adapter: Path, folder,
               config: dict) -> MergePlan:
    base = {k: m.shape for k, m in folder.tensors.items()}
    multimodal = _multimodal_shapes(config)
    known = {**multimodal, **base}
    trainables = _trainables(adapter, known)
    empty = empty_adapter({k: weights.get(k) for k in weights.keys})
    if empty:
        raise MergeError(f"{weights.path}: {empty}: the adapter changes nothing (saved without "
                         "its parameters gathered?); refusing to write a merge of it")
    modules, biases = classify(weights)
    dropped = _tower_modules(weights, modules, biases)
    for target, m in modules.items():
        _check_target(weights, cfg, target, m, known.get(target))
    for key, source in biases.items():
        if key not in known:
            raise MergeError(f"{weights.path}: {source} names {key}, which the base checkpoint "
                             "does not hold")
    unloaded = sorted(set(multimodal) - set(base) - set(trainables))
    if unloaded:
        raise MergeError(f"{adapter}: {unloaded[0]} is in neither the base nor "
                         f"{NON_LORA_TRAINABLES}; the projector would stay random")
    added = sorted(set(trainables) - set(base))
    return MergePlan(modules, biases, trainables, added, dropped)


class _Shard:
    """One base shard, its tensors mapped from their validated offsets while it is rewritten."""

    def __init__(self, folder, file: str, stack: ExitStack):
        header, maps = folder.header(file), {}
        self.get = lambda key: as_tensor(header[key], maps)


def _is_legacy_buffer(key: str) -> bool:
    return key.endswith("rotary_emb.inv_freq")


class _Producer:
    """Makes each output tensor: base (or trainable) -> adapter bias -> dtype -> merge."""

    def __init__(self, plan: MergePlan, cfg: AdapterConfig, weights: AdapterWeights, folder,
                 dtype: torch.dtype | None, model_dtype: torch.dtype, device: str):
        self.plan, self.cfg, self.weights, self.folder = plan, cfg, weights, folder
        self.dtype, self.model_dtype, self.device = dtype, model_dtype, device
        self.workspace = Workspace()  # each tensor is consumed before the next is made

    def out_dtype(self, key: str) -> torch.dtype:
        """The requested dtype; without one, the base's own. Legacy float32 rotary buffers
        stay as stored; keys the base lacks take the model's dtype."""
        meta = self.folder.tensors.get(key)
        if meta is None:
            return self.model_dtype
        stored = getattr(torch, meta.dtype)
        if not stored.is_floating_point or _is_legacy_buffer(key) or self.dtype is None:
            return stored
        return self.dtype

    def tensor(self, key: str, shard: _Shard | None, check_finite: bool = True,
               workspace: Workspace | None = None) -> torch.Tensor:
        plan = self.plan
        t = plan.trainables[key] if key in plan.trainables else shard.get(key)
        if key in plan.biases:
            t = self.weights.get(plan.biases[key])
        t = t.to(self.out_dtype(key))
        if key in plan.modules:
            m = plan.modules[key]
            _, scaling = self.cfg.rank_and_scaling(key.removesuffix(".weight"))
            t = merge_weight(t, self.weights.get(m.a), self.weights.get(m.b), scaling,
                             magnitude=self.weights.get(m.magnitude) if m.magnitude else None,
                             fan_in_fan_out=self.cfg.fan_in_fan_out, device=self.device,
                             workspace=workspace or self.workspace)
        if check_finite and (key in plan.modules or key in plan.biases
                             or key in plan.trainables) \
                and t.is_floating_point() and not all_finite(t):
            source = self.weights.path if key not in plan.trainables or key in plan.modules \
                else NON_LORA_TRAINABLES
            raise MergeError(f"{source}: merging gives non-finite values (NaN or inf) in {key}; "
                             "the adapter is broken, nothing was written")
        return t.contiguous()



class _Ahead:
    """The writer's chunk source for one shard, one tensor ahead: a thread reads and merges
    the next tensor (page faults on the base, the matmul in torch's threads) while the writer
    writes this one, so the disk and the arithmetic overlap instead of taking turns.

    Two workspaces alternate, and a tensor's buffers are handed back only once the writer has
    consumed its bytes: at most two merged tensors are alive (2 x 180 MB at 7B). The thread
    makes tensors in the writer's own order; an error there is raised here, at its tensor."""

    def __init__(self, producer: _Producer, shard: _Shard, order: list[Tensor]):
        self.producer, self.shard, self.order = producer, shard, order
        self.free = threading.Semaphore(2)
        self.made: queue.Queue = queue.Queue()
        self.stopped = False
        self.thread = threading.Thread(target=self._make, name="merge-ahead", daemon=True)
        self.thread.start()

    def _make(self) -> None:
        workspaces = (Workspace(), Workspace())
        try:
            for i, info in enumerate(self.order):
                self.free.acquire()
                if self.stopped:
                    return
                t = self.producer.tensor(info.key, self.shard, workspace=workspaces[i % 2])
                self.made.put((info.key, t, None))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the writer's thread
            self.made.put((None, None, exc))

    def chunks(self, info: Tensor):
        key, t, error = self.made.get()
        if error is not None:
            raise error
        if key != info.key:  # the writers' order changed under us: never write a wrong tensor
            raise MergeError(f"internal order: made {key}, the writer asked for {info.key}")
        yield t.reshape(-1).view(torch.uint8).numpy()
        del t
        self.free.release()
        release_freed_memory()

    def close(self) -> None:
        self.stopped = True
        self.free.release()
        self.free.release()
        self.thread.join()


@lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc). Merging allocates tensors of many sizes
    per layer; glibc keeps the freed ones and, measured on the 7B `.bin` merge, the process
    grew by ~70 MB per layer (to 2 GB anonymous) without this, and stayed flat with it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _check_paths(adapter: Path, base: Path, out: Path) -> None:
    check_output(out, [adapter, base])


def _read_llava_config(adapter: Path, base: Path) -> dict:
    for folder in (adapter, base):
        if inside(folder, "config.json", must_exist=False) is not None:
            return read_config_json(folder)
    raise MergeError(f"{adapter}: no config.json here or in the base {base}")


def _model_dtype(folder, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    meta = folder.tensors.get("model.embed_tokens.weight")
    name = meta.dtype if meta is not None else "float16"
    return OUT_DTYPES.get(name, torch.float16)


def _write(folder, plan: MergePlan, producer: _Producer, out: Path) -> tuple[int, int]:
    files = folder.files
    written = []
    for i, file in enumerate(files):
        keys = list(folder.header(file)) + (plan.added if i == len(files) - 1 else [])
        infos = []
        for key in keys:
            meta = folder.tensors.get(key)
            dtype = producer.out_dtype(key)
            if dtype not in _DTYPE_NAMES:
                raise MergeError(f"{folder.path / file}: {key} is {dtype}; the merge writes "
                                 "float16, bfloat16 and float32 tensors only")
            shape = meta.shape if meta is not None else tuple(plan.trainables[key].shape)
            infos.append(Tensor(key, tuple(shape), _DTYPE_NAMES[dtype]))
        with ExitStack() as stack:
            shard = _Shard(folder, file, stack)
            order = new_shard_order(folder.format, infos)
            ahead = _Ahead(producer, shard, order)
            stack.callback(ahead.close)
            write_shard(folder.format, out / file, order, ahead.chunks)
        written.append((file, infos))
    index = index_of(written)
    if folder.index_file:
        (out / folder.index_file).write_text(index_json(index))
    return len(index["weight_map"]), index["metadata"]["total_size"]


def _write_side_files(config: dict, dtype: torch.dtype, base: Path, out: Path) -> None:
    # A QLoRA run saves its 4-bit quantization_config with the model config; the merged
    # weights are full precision, and loading them "quantized" would misread them.
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config["torch_dtype"] = _DTYPE_NAMES[dtype]
    if "dtype" in config:
        config["dtype"] = _DTYPE_NAMES[dtype]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copy_files(base, out, AUX_FILES)


class MergedView:
    """The merge of an adapter into a base, tensor by tensor on demand, with merge_lora's
    arithmetic and nothing written: what verify-release holds another tool's merge to."""

    def __init__(self, folder, plan: MergePlan, producer: _Producer, config: dict):
        self.folder, self.plan, self.producer, self.config = folder, plan, producer, config
        self.keys = list(folder.tensors) + plan.added
        self.dtype = producer.model_dtype

    def base(self, key: str) -> torch.Tensor | None:
        """The base's tensor (None for a trainable the base lacks)."""
        source = self.folder.tensors.get(key)
        return None if source is None else as_tensor(source, {})

    def merged(self, key: str) -> torch.Tensor:
        """The merged tensor, as merge_lora would write it (without its non-finite check: a
        comparison sees a NaN as a difference anyway). A merged weight lives in the view's
        workspace: valid until the next call."""
        return self.producer.tensor(key, _OneTensor(self), check_finite=False)


class _OneTensor:
    """A base tensor through a mapping of its own (dropped with it: memory stays a tensor)."""

    def __init__(self, view: MergedView):
        self.get = view.base


@contextmanager
def merged_view(adapter, base, dtype: str | None = None):
    """The MergedView of `adapter` into `base` (both validated as merge_lora validates them)."""
    adapter, base = Path(adapter), Path(base)
    if dtype is not None and dtype not in OUT_DTYPES:
        raise MergeError(f"dtype {dtype!r}: expected one of {', '.join(OUT_DTYPES)}")
    cfg = AdapterConfig.read(adapter)
    config = _read_llava_config(adapter, base)
    folder = open_folder(base)
    check_folder_claims(folder, config, adapter / "config.json")
    folder.check()
    check_config_fits(config, folder.tensors, base, MergeError)
    torch_dtype = OUT_DTYPES[dtype] if dtype else None
    with ExitStack() as stack:
        weights = AdapterWeights(adapter, stack)
        plan = plan_merge(cfg, weights, adapter, folder, config)
        producer = _Producer(plan, cfg, weights, folder, torch_dtype,
                             _model_dtype(folder, torch_dtype), "cpu")
        yield MergedView(folder, plan, producer, config)


def merge_lora(adapter, base, out, *, dtype: str | None = None, force: bool = False,
               device: str = "cpu") -> MergeResult:
    """Merge the LLaVA LoRA folder `adapter` into the checkpoint `base`, writing a full LLaVA
    checkpoint at `out` atomically (nothing is left behind on any error)."""
    start = time.perf_counter()
    adapter, base, out = Path(adapter), Path(base), Path(out)
    _check_paths(adapter, base, out)
    check_target(out, force)
    with merged_view(adapter, base, dtype) as view:
        view.producer.device = device
        with atomic_dir(out, force) as tmp:
            count, nbytes = _write(view.folder, view.plan, view.producer, tmp)
            _write_side_files(view.config, view.dtype, base, tmp)
    plan = view.plan
    return MergeResult(out, len(plan.modules), len(plan.biases), len(plan.trainables), count,
                       nbytes, _DTYPE_NAMES[view.dtype], plan.dropped,
                       time.perf_counter() - start)
