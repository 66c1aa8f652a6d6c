"""Quantized-load benchmark: memory and speed per mode, each mode in a fresh process.

A fresh process per mode keeps one mode's allocations, caches and allocator state from
inflating another's. The parent builds the model's skeleton on the meta device (no weights)
for the theoretical footprint, runs the reference mode first (fp32 on CPU, fp16 on CUDA) so
its probe logits are on disk for the others' drift, then one child per mode. Each child writes
its figures as JSON; the parent adds the child's wall time and peak RSS, checks them against
theory and the goal, prints a table and writes records (harness.results schema).

In a child: imports first (timed apart), then the load: wall time, CUDA peak allocated and
reserved (reset just before), NVML device memory (sampled), peak RSS (VmHWM, reset just
before); the footprint counted tensor by tensor; dtype and structure checks; the probe's drift
against the reference. Then LLaVA's generate as warm-up, and `repeat` timed rounds of prefill
(the spliced prompt's forward and first token) and decode (new_tokens - 1 cached steps), each
phase timed on its own between CUDA synchronisations, so decode is never a small difference of
two noisy totals.

On CPU, RSS counts file-backed pages: a checkpoint already in the load dtype is mapped, not
copied, and paged in when first used, so the load peak can sit below the footprint and the
generation peak above it.
"""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import HarnessError
from ..measure import run_measured
from ..ops.quant import mode as quant_mode

SUITE = "bench-quant"
# The goal: NF4 with double quant peaks at load within 10% of the theoretical footprint.
GOALS = {"nf4-dq": 1.10}
MIB = 2**20
_CHILD = "from harness.bench.quant import child_main; child_main()"
# What every measured mode's record holds (a complete record); NVML figures come on top where
# the driver answers, as nvml_process_peak_* or nvml_device_peak_*.
REQUIRED_METRICS = (
    "import_s", "load_s", "load_peak_bytes", "load_peak_ratio", "footprint",
    "footprint_after_generate", "hf_memory_footprint", "theory", "footprint_ratio",
    "bits_per_param", "num_parameters", "num_parameters_expected", "max_abs_logit_diff",
    "top1_agreement", "prefill_tokens", "prefill_s_median", "prefill_s_p90", "decode_s_median",
    "decode_s_p90", "decode_tokens_per_s_median", "decode_tokens_per_s_p90")
REQUIRED_BY_DEVICE = {
    "cpu": ("peak_rss_load", "rss_load_delta", "peak_rss_generate"),
    "cuda": ("cuda_peak_allocated_load", "cuda_peak_reserved_load", "cuda_allocated_after_load",
             "cuda_peak_allocated_generate", "cuda_peak_reserved_generate")}
# Added by the parent from the child process as a whole.
PROCESS_METRICS = ("process_wall_s", "process_peak_rss")


def required_metrics(device: str, subprocess: bool = True) -> tuple[str, ...]:
    return (REQUIRED_METRICS + REQUIRED_BY_DEVICE[device]
            + (PROCESS_METRICS if subprocess else ()))


class QuantBenchError(HarnessError):
    pass


@dataclass(frozen=True)
class QuantBench:
    checkpoint: Path
    name: str
    modes: tuple[str, ...]
    device: str = "cpu"
    prompt_tokens: int = 64
    new_tokens: int = 64
    batch: int = 1
    repeat: int = 5
    warmup: int = 1
    compute_dtype: str = "float16"
    vision_tower: Path | None = None

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise QuantBenchError(f"device {self.device!r}: expected cpu or cuda")
        if self.new_tokens < 2:
            raise QuantBenchError(f"new tokens {self.new_tokens}: decode needs at least 2 (the "
                                  "first token comes with the prefill)")
        for name in self.modes:
            quant_mode(name)
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise QuantBenchError(f"modes {self.modes}: expected distinct modes, at least one")

    @property
    def reference_mode(self) -> str:
        """The drift reference: fp32 on CPU; fp16 on CUDA (the published dtype)."""
        return "fp16" if self.device == "cuda" else "fp32"

    def case(self, mode: str) -> str:
        return f"{self.name}-{mode}-{self.device}"


# --- the child ------------------------------------------------------------------------------

def _proc_status(*names: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in names:
                out[key] = int(line.split()[1]) * 1024
    return out


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


class _ProcessInfo(ctypes.Structure):
    # nvmlProcessInfo_t as nvmlDeviceGetComputeRunningProcesses_v3 (and _v2) fill it.
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong),
                ("used", ctypes.c_ulonglong)]


def _nvml_library():
    """NVML's C library, initialised; None without an NVIDIA driver."""
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    return lib if lib.nvmlInit_v2() == 0 else None


class NvmlSampler:
    """Peak device memory from NVML (the driver's view: CUDA context and allocator slack
    included), sampled every few milliseconds on a thread.

    Source "process": this process's entry in the driver's list of compute processes. In a
    container the driver lists host PIDs, so the entry is not found; then source "device": the
    device's used memory minus what it used before this process started CUDA (exact on a GPU
    nobody else uses). Without NVML, peak() is (None, "none"). `lib` is for tests.
    """

    def __init__(self, lib=None, interval_s: float = 0.005):
        self.lib = lib if lib is not None else _nvml_library()
        self.interval_s = interval_s
        self.source, self.handle = "none", None
        self._peak = self._baseline = 0
        self._stopped = threading.Event()
        # Every device's used memory now, before this process has a CUDA context.
        self._before = self._all_devices_used() if self.lib is not None else {}

    def _all_devices_used(self) -> dict[int, int | None]:
        count = ctypes.c_uint(0)
        if self.lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return {}
        out = {}
        for index in range(count.value):
            handle = ctypes.c_void_p()
            if self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) == 0:
                out[index] = self._device_used(handle)
        return out

    def _device_used(self, handle) -> int | None:
        memory = _Memory()
        if self.lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0:
            return None
        return memory.used

    def _process_used(self, handle) -> int | None:
        infos, count = (_ProcessInfo * 256)(), ctypes.c_uint(256)
        query = getattr(self.lib, "nvmlDeviceGetComputeRunningProcesses_v3", None) or \
            getattr(self.lib, "nvmlDeviceGetComputeRunningProcesses_v2", None)
        if query is None or query(handle, ctypes.byref(count), infos) != 0:
            return None
        pid = os.getpid()
        used = [infos[i].usedGpuMemory for i in range(count.value) if infos[i].pid == pid]
        # NVML_VALUE_NOT_AVAILABLE is the all-ones unsigned long long.
        return used[0] if used and used[0] < 2**63 else None

    def start(self, uuid: str) -> None:
        """Begin sampling the device with this UUID (torch's `get_device_properties().uuid`),
        after this process's CUDA context exists."""
        if self.lib is None:
            return
        handle = ctypes.c_void_p()
        text = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        found = self.lib.nvmlDeviceGetHandleByUUID(text.encode(), ctypes.byref(handle)) == 0
        if not found and len(self._before) == 1:  # one GPU: no doubt which one it is
            found = self.lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle)) == 0
        if not found:
            return
        index = ctypes.c_uint(0)
        if self.lib.nvmlDeviceGetIndex(handle, ctypes.byref(index)) != 0:
            return
        self.handle = handle
        self.source = "process" if self._process_used(handle) is not None else "device"
        if self.source == "device":
            self._baseline = self._before.get(index.value) or 0
        threading.Thread(target=self._loop, daemon=True).start()

    def read(self) -> int | None:
        used = (self._process_used(self.handle) if self.source == "process"
                else self._device_used(self.handle))
        return None if used is None else max(used - self._baseline, 0)

    def _loop(self) -> None:
        while not self._stopped.wait(self.interval_s):
            used = self.read()
            if used is not None:
                self._peak = max(self._peak, used)

    def stop(self) -> None:
        self._stopped.set()

    def reset(self) -> None:
        if self.source != "none":
            self._peak = self.read() or 0

    def peak(self) -> tuple[int | None, str]:
        if self.source == "none":
            return None, "none"
        return max(self._peak, self.read() or 0), self.source


class _Cuda:
    """CUDA allocator peaks and NVML device memory, or nothing on CPU."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.on = device == "cuda"
        self.nvml = None
        if self.on:
            nvml = NvmlSampler()  # before CUDA starts: the device baseline excludes our context
            torch.cuda.init()
            torch.empty(1, device="cuda")  # create the context so NVML lists this process
            nvml.start(str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid))
            self.nvml = nvml

    def sync(self) -> None:
        if self.on:
            self.torch.cuda.synchronize()

    def close(self) -> None:
        if self.nvml is not None:
            self.nvml.stop()

    def reset(self) -> None:
        if self.on:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats()
            self.nvml.reset()

    def peaks(self, phase: str) -> dict:
        if not self.on:
            return {}
        self.sync()
        cuda = self.torch.cuda
        out = {f"cuda_peak_allocated_{phase}": (cuda.max_memory_allocated() / MIB, "MiB"),
               f"cuda_peak_reserved_{phase}": (cuda.max_memory_reserved() / MIB, "MiB")}
        peak, source = self.nvml.peak()
        if peak is not None:
            out[f"nvml_{source}_peak_{phase}"] = (peak / MIB, "MiB")
        return out


def _bench_inputs(model, processor, job: dict):
    """`batch` rows of BOS + text + one image token, and one probe image per row, in the
    projector's dtype (quantized models keep it unquantized)."""
    from ..model.images import process_images
    from ..model.probe import probe_ids, probe_image

    ids = probe_ids(model.config.vocab_size, job["prompt_tokens"], images=1)
    ids = ids.repeat(job["batch"], 1).to(model.device)
    pixels = process_images([probe_image()] * job["batch"], processor, model.config)
    dtype = next(model.get_model().mm_projector.parameters()).dtype
    return ids, pixels.to(device=model.device, dtype=dtype)


def _prefill_decode(model, ids, pixels, new_tokens: int, cuda: _Cuda) -> tuple[float, float]:
    """(prefill s, decode s) of one greedy generation, timed phase by phase: the spliced
    prompt's forward and first token, then new_tokens - 1 single-token steps on the cache.
    Timing the phases directly (rather than generate(1) subtracted from generate(M)) keeps
    decode positive and exact however noisy the machine."""
    import torch

    cuda.sync()
    start = time.perf_counter()
    embeds, position_ids, mask, _ = model.prepare_multimodal(ids, None, None, None, pixels)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    cuda.sync()
    prefilled = time.perf_counter()
    for _ in range(new_tokens - 1):
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values,
                    use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    cuda.sync()
    return prefilled - start, time.perf_counter() - prefilled


def _speed(model, processor, job: dict, cuda: _Cuda) -> tuple[dict, list[str]]:
    ids, pixels = _bench_inputs(model, processor, job)
    m, batch = job["new_tokens"], job["batch"]
    # Warm-up through LLaVA's own generate (splice once, then transformers' loop), which also
    # checks that the model really generates m tokens a row.
    problems = []
    for _ in range(job["warmup"]):
        out = model.generate(ids, images=pixels, max_new_tokens=m, min_new_tokens=m,
                             do_sample=False, pad_token_id=0)
        if tuple(out.shape) != (batch, m):
            problems.append(f"generate gave {tuple(out.shape)} tokens, expected {(batch, m)}")
        _prefill_decode(model, ids, pixels, m, cuda)
    prefill, decode = zip(*(_prefill_decode(model, ids, pixels, m, cuda)
                            for _ in range(job["repeat"])))
    rate = batch * (m - 1)
    patches = model.get_vision_tower().num_patches_per_side ** 2
    return {
        "prefill_tokens": (batch * (job["prompt_tokens"] + 1 + patches), "tokens"),
        "prefill_s_median": (statistics.median(prefill), "s"),
        "prefill_s_p90": (_percentile(prefill, 0.9), "s"),
        "decode_s_median": (statistics.median(decode), "s"),
        "decode_s_p90": (_percentile(decode, 0.9), "s"),
        "decode_tokens_per_s_median": (rate / statistics.median(decode), "tokens/s"),
        # The rate at the p90 (slow) decode time: what 9 rounds in 10 reach or beat.
        "decode_tokens_per_s_p90": (rate / _percentile(decode, 0.9), "tokens/s"),
    }, problems


def structure_problems(model, load_dtype, job: dict) -> list[str]:
    """Projector, lm_head and vision tower plain and in the load dtype; the expected number of
    bitsandbytes layers; num_parameters() equal to the unquantized count (transformers
    #25978: 4-bit models used to report half)."""
    def quantized(module) -> list[str]:
        return [n for n, x in module.named_modules()
                if type(x).__module__.startswith("bitsandbytes")]

    inner = model.get_model()
    problems = []
    for label, module in (("mm_projector", inner.mm_projector), ("lm_head", model.lm_head),
                          ("vision tower", inner.vision_tower)):
        if quantized(module):
            problems.append(f"{label} has bitsandbytes layers ({quantized(module)[0]})")
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()})
        if dtypes != [str(load_dtype).removeprefix("torch.")]:
            problems.append(f"{label} dtype {', '.join(dtypes)}, expected {load_dtype}")
    layers = len(quantized(model))
    if layers != job["expected_quantized_layers"]:
        problems.append(f"{layers} bitsandbytes layers, expected "
                        f"{job['expected_quantized_layers']}")
    if model.num_parameters() != job["expected_parameters"]:
        problems.append(f"num_parameters() {model.num_parameters():,} != the unquantized count "
                        f"{job['expected_parameters']:,}")
    return problems


def drift_metrics(logits, job: dict) -> dict:
    from safetensors.torch import load_file, save_file

    logits = logits.float().cpu()
    if job.get("write_reference"):
        save_file({"logits": logits.contiguous()}, job["write_reference"])
    if not job.get("reference"):
        return {}
    ref = load_file(job["reference"])["logits"]
    return {"max_abs_logit_diff": ((logits - ref).abs().max().item(), "logit", "lower"),
            "top1_agreement": ((logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                               "ratio", "higher")}


def _load(job: dict, cuda: _Cuda):
    import torch

    from ..ops.load import load
    from ..ops.quant import bnb_config

    m = quant_mode(job["mode"])
    dtype = m.load_dtype(job["compute_dtype"])
    rss_before = _proc_status("VmRSS")["VmRSS"]
    reset_ok = _reset_peak_rss()
    cuda.reset()
    allocated_before = torch.cuda.memory_allocated() if cuda.on else 0
    start = time.perf_counter()
    loaded = load(job["checkpoint"], None, "llava-bench", device=job["device"], dtype=dtype,
                  device_map={"": 0} if cuda.on else "auto", detect="files",
                  vision_tower=job.get("vision_tower"), vision_tower_dtype=dtype,
                  quantization_config=bnb_config(job["mode"], job["compute_dtype"]))
    cuda.sync()
    load_s = time.perf_counter() - start
    hwm = _proc_status("VmHWM")["VmHWM"] if reset_ok else None
    metrics = {"load_s": (load_s, "s"), **cuda.peaks("load")}
    if hwm is not None:
        metrics["peak_rss_load"] = (hwm / MIB, "MiB")
        metrics["rss_load_delta"] = ((hwm - rss_before) / MIB, "MiB")
    if cuda.on:
        metrics["load_peak_bytes"] = (torch.cuda.max_memory_allocated() - allocated_before, "B")
        metrics["cuda_allocated_after_load"] = (torch.cuda.memory_allocated() / MIB, "MiB")
    elif hwm is not None:
        metrics["load_peak_bytes"] = (hwm - rss_before, "B")
    return loaded, getattr(torch, dtype), metrics


def run_child(job: dict) -> dict:
    """One mode, in this (fresh) process: the figures as {name: (value, unit[, direction])}."""
    start = time.perf_counter()
    import torch
    import transformers  # noqa: F401  (imported here so the load time is the load's alone)

    if quant_mode(job["mode"]).quantized:
        import bitsandbytes  # noqa: F401

    from ..model.probe import probe_logits
    from ..ops.quant import measured_footprint

    cuda = _Cuda(job["device"])
    metrics = {"import_s": (time.perf_counter() - start, "s")}
    loaded, dtype, load_metrics = _load(job, cuda)
    model = loaded.model
    metrics |= load_metrics
    metrics |= {"footprint": (measured_footprint(model), "B"),
                "hf_memory_footprint": (model.get_memory_footprint(), "B"),
                "num_parameters": (model.num_parameters(), "params")}
    problems = structure_problems(model, dtype, job)
    with torch.inference_mode():
        metrics |= drift_metrics(probe_logits(model, loaded.image_processor), job)
        if job["measure"]:
            reset_ok = _reset_peak_rss()
            cuda.reset()
            speed, more = _speed(model, loaded.image_processor, job, cuda)
            metrics |= speed | cuda.peaks("generate")
            problems += more
            if reset_ok:
                metrics["peak_rss_generate"] = (_proc_status("VmHWM")["VmHWM"] / MIB, "MiB")
            # bitsandbytes may repack weights on the first forward (on CPUs with AVX512-BF16 it
            # turns 4-bit state into bfloat16 absmax): what the model holds while it runs.
            metrics["footprint_after_generate"] = (measured_footprint(model), "B")
    cuda.close()
    return {"metrics": metrics, "problems": problems}


def child_main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    result = run_child(job)
    Path(job["out"]).write_text(json.dumps(result))


# --- the parent -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ModeResult:
    mode: str
    metrics: dict
    problems: list
    error: str | None = None


def _check_lengths(bench: QuantBench) -> None:
    """Prompt + image patches + new tokens must fit the positions and the splice's
    truncation length, or the figures would be for a truncated prompt."""
    from transformers import CLIPVisionConfig

    from ..model.config import read_config_json

    config = read_config_json(bench.checkpoint)
    tower = bench.vision_tower or Path(config.get("mm_vision_tower") or "")
    vision = CLIPVisionConfig.from_pretrained(tower)
    patches = (vision.image_size // vision.patch_size) ** 2
    need = bench.prompt_tokens + 1 + patches + bench.new_tokens
    limits = {name: config.get(name) for name in ("max_position_embeddings",
                                                  "tokenizer_model_max_length")}
    for name, limit in limits.items():
        if limit and need > limit:
            raise QuantBenchError(f"{bench.checkpoint}/config.json: {name} {limit} < prompt "
                                  f"{bench.prompt_tokens} + BOS + {patches} image patches + "
                                  f"{bench.new_tokens} new tokens; use fewer tokens")


def child_job(bench: QuantBench, mode: str, parts, work: Path, measure: bool = True) -> dict:
    m = quant_mode(mode)
    ref = work / "reference.safetensors"
    is_ref = mode == bench.reference_mode
    return {"checkpoint": str(bench.checkpoint), "mode": mode, "device": bench.device,
            "vision_tower": str(bench.vision_tower) if bench.vision_tower else None,
            "compute_dtype": bench.compute_dtype, "prompt_tokens": bench.prompt_tokens,
            "new_tokens": bench.new_tokens, "batch": bench.batch, "repeat": bench.repeat,
            "warmup": bench.warmup, "measure": measure,
            "expected_quantized_layers": len(parts.linears) if m.quantized else 0,
            "expected_parameters": parts.num_parameters,
            # The reference mode writes the probe logits the others (and itself) compare with.
            "write_reference": str(ref) if is_ref else None, "reference": str(ref),
            "out": str(work / f"{mode}.json")}


def _run_mode(job: dict, work: Path) -> ModeResult:
    spec = work / f"{job['mode']}.job.json"
    spec.write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    measured = run_measured([sys.executable, "-c", _CHILD, str(spec)], env=env)
    if measured.returncode:
        lines = [x for x in measured.stderr.strip().splitlines() if x.strip()]
        return ModeResult(job["mode"], {}, [], lines[-1] if lines else
                          f"exit {measured.returncode}, no output")
    result = json.loads(Path(job["out"]).read_text())
    metrics = {k: tuple(v) for k, v in result["metrics"].items()}
    metrics["process_wall_s"] = (measured.wall_s, "s")
    metrics["process_peak_rss"] = (measured.peak_rss_bytes / MIB, "MiB")
    return ModeResult(job["mode"], metrics, result["problems"])


def cpu_4bit_problem(parts) -> str | None:
    """bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks 4-bit weights on the first forward
    in blocks of 32 output rows: a layer whose out_features is not a multiple of 32 fails
    there (an assertion deep inside). Say so up front instead."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        return None
    bad = next(((o, i) for o, i in parts.linears if o % 32 or i % 2), None)
    if bad is None:
        return None
    return (f"bitsandbytes' CPU 4-bit kernel (AVX512-BF16 path) needs out_features divisible "
            f"by 32 and even in_features; a layer is {bad[0]} x {bad[1]}")


def with_theory(result: ModeResult, bench: QuantBench, parts) -> tuple[dict, list[str]]:
    """The child's figures plus theory, ratios and the goal check."""
    from ..ops.quant import theoretical_footprint
    from ..tolerances import tolerance

    theory = theoretical_footprint(result.mode, parts, bench.compute_dtype)
    metrics = dict(result.metrics)
    metrics["theory"] = (theory.total, "B")
    metrics["bits_per_param"] = (theory.bits_per_param, "bits")
    metrics["num_parameters_expected"] = (parts.num_parameters, "params")
    problems = list(result.problems)
    if "footprint" in metrics:
        ratio = metrics["footprint"][0] / theory.total
        metrics["footprint_ratio"] = (ratio, "ratio")
        tol = tolerance("quant.footprint")
        if abs(ratio - 1) > tol.rtol:
            problems.append(f"footprint {ratio:.4f}x theory (tolerance {tol.rtol})")
    if "load_peak_bytes" in metrics:
        ratio = metrics["load_peak_bytes"][0] / theory.total
        metrics["load_peak_ratio"] = (ratio, "ratio", "lower")
        goal = GOALS.get(result.mode)
        if bench.device == "cuda" and goal is not None and ratio > goal:
            problems.append(f"peak allocated at load {ratio:.3f}x theory (goal <= {goal})")
    return metrics, problems


def mode_record(bench: QuantBench, result: ModeResult, parts, skip: str | None):
    from ..results import make_record

    if skip is not None:
        return make_record(SUITE, bench.case(result.mode), {}, outcome="skipped", reason=skip)
    metrics, problems = with_theory(result, bench, parts)
    if result.error is not None:
        return make_record(SUITE, bench.case(result.mode), metrics, outcome="error",
                           reason=result.error)
    return make_record(SUITE, bench.case(result.mode), metrics,
                       outcome="failed" if problems else "passed",
                       reason="; ".join(problems) or None)


def _progress(i: int, n: int, record) -> None:
    m = {k: v.value for k, v in record.metrics.items()}
    if record.outcome in ("skipped", "error"):
        text = f"{record.outcome}: {record.reason}"
    else:
        text = (f"load {m['load_s']:.2f} s, footprint {m['footprint'] / MIB:.1f} MiB "
                f"({m['footprint_ratio']:.3f}x theory), decode "
                f"{m.get('decode_tokens_per_s_median', 0):.1f} tokens/s"
                + (f" [{record.outcome}: {record.reason}]" if record.reason else ""))
    print(f"[{i}/{n}] {record.case}: {text}", file=sys.stderr, flush=True)


def _reference(bench: QuantBench, parts, work: Path) -> None:
    """The reference mode's probe logits only, when it is not one of the modes measured."""
    print(f"[0] reference {bench.reference_mode}: probe logits", file=sys.stderr, flush=True)
    ref = _run_mode(child_job(bench, bench.reference_mode, parts, work, measure=False), work)
    if ref.error:
        raise QuantBenchError(f"reference {bench.reference_mode} failed: {ref.error}")


def run(bench: QuantBench):
    """Every mode of `bench`, reference first; returns the records in mode order."""
    from ..ops.quant import parts_from_folder

    parts = parts_from_folder(bench.checkpoint, bench.vision_tower)
    _check_lengths(bench)
    order = sorted(bench.modes, key=lambda name: name != bench.reference_mode)
    skips = {name: cpu_4bit_problem(parts) if bench.device == "cpu"
             and quant_mode(name).bits == 4 else None for name in order}
    records = {}
    with tempfile.TemporaryDirectory(prefix="llava-bench-quant-") as tmp:
        work = Path(tmp)
        if bench.reference_mode not in order and not all(skips.values()):
            _reference(bench, parts, work)
        for i, name in enumerate(order, 1):
            result = ModeResult(name, {}, []) if skips[name] else _run_mode(
                child_job(bench, name, parts, work), work)
            records[name] = mode_record(bench, result, parts, skips[name])
            _progress(i, len(order), records[name])
    return [records[name] for name in bench.modes]


SUMMARY_COLUMNS = (
    ("load_s", "load s", 1, "{:.2f}"), ("footprint", "footprint MiB", MIB, "{:.1f}"),
    ("theory", "theory MiB", MIB, "{:.1f}"), ("footprint_ratio", "meas/theory", 1, "{:.3f}"),
    ("bits_per_param", "bits/param", 1, "{:.3f}"),
    ("load_peak_ratio", "load peak/theory", 1, "{:.3f}"),
    ("cuda_peak_allocated_load", "CUDA peak load MiB", 1, "{:.0f}"),
    ("cuda_peak_allocated_generate", "CUDA peak gen MiB", 1, "{:.0f}"),
    ("peak_rss_load", "RSS peak load MiB", 1, "{:.0f}"),
    ("peak_rss_generate", "RSS peak gen MiB", 1, "{:.0f}"),
    ("prefill_s_median", "prefill s", 1, "{:.4f}"),
    ("prefill_s_p90", "prefill p90 s", 1, "{:.4f}"),
    ("decode_tokens_per_s_median", "decode tok/s", 1, "{:.1f}"),
    ("decode_tokens_per_s_p90", "decode tok/s p90", 1, "{:.1f}"),
    ("max_abs_logit_diff", "max |dlogit|", 1, "{:.4f}"),
    ("top1_agreement", "top-1", 1, "{:.3f}"))


def summary_table(records) -> str:
    from tabulate import tabulate

    present = [c for c in SUMMARY_COLUMNS if any(c[0] in r.metrics for r in records)]
    rows = []
    for r in records:
        row = [r.case.rsplit("-", 1)[0], r.outcome]
        for key, _, scale, fmt in present:
            metric = r.metrics.get(key)
            row.append(fmt.format(metric.value / scale) if metric else "")
        rows.append(row)
    return tabulate(rows, headers=["case", "outcome", *[c[1] for c in present]],
                    tablefmt="github", disable_numparse=True)


def settings(bench: QuantBench) -> dict[str, str]:
    return {k: str(v) for k, v in asdict(bench).items()} | {
        "reference_mode": bench.reference_mode}


def bench_quant(bench: QuantBench, out: Path | None = None) -> int:
    """Run, print the table, write the results file; exit 1 when a mode failed or errored."""
    from ..environment import current
    from ..results import Results, new_run_id, now, write_results

    records = run(bench)
    print(f"{bench.name} on {bench.device} ({current().label()}): prompt {bench.prompt_tokens} "
          f"tokens + 1 image, {bench.new_tokens} new tokens, batch {bench.batch}, median of "
          f"{bench.repeat} after {bench.warmup} warm-up; drift vs {bench.reference_mode}")
    print(summary_table(records))
    for r in records:
        if r.reason:
            print(f"{r.case}: {r.outcome}: {r.reason}")
    if out is not None:
        results = Results(run_id=new_run_id(), environment=current(), records=tuple(records),
                          created=now(), settings=settings(bench))
        write_results(results, out)
        print(f"records written to {out}")
    return 1 if any(r.outcome in ("failed", "error") for r in records) else 0
