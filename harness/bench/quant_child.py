"""Quantized-load benchmark, the child's side: one mode measured in this fresh process.

harness/bench/quant.py starts one such process per mode through the launcher (`child_main`)
and hands it a job (JSON); this writes back the figures as JSON. torch and transformers are
imported inside the functions, so the parent, which imports this module to name its child,
stays light. Imports first (timed apart), then the load: wall time, CUDA peak
allocated and reserved (reset just before), NVML device memory (sampled), peak RSS (VmHWM,
reset just before); the footprint counted tensor by tensor; dtype and structure checks; the
probe's drift against the reference. Then LLaVA's generate as warm-up, and `repeat` timed
rounds of prefill (the spliced prompt's forward and first token) and decode (new_tokens - 1
cached steps), each phase timed on its own between CUDA synchronisations, so decode is never a
small difference of two noisy totals.

On CPU, RSS counts file-backed pages: a checkpoint already in the load dtype is mapped, not
copied, and paged in when first used, so the load peak can sit below the footprint and the
generation peak above it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..console import quiet_third_party, quiet_transformers
from ..model.kv_cache import carried
from ..ops.quant import bnb_config, measured_footprint
from ..ops.quant import mode as quant_mode
from ..report.sample import Sample
from .measure import MIB, NvmlSampler, reset_peak_rss, status_bytes


class _Cuda:
    """CUDA allocator peaks and NVML device memory, or nothing on CPU."""

    def __init__(self, device: str):
        import torch  # heavy: torch

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
    from ..model.images import process_images  # heavy: torch
    from ..model.probe import probe_ids, probe_image  # heavy: torch

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
    import torch  # heavy: torch

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
        out = model(input_ids=token, attention_mask=mask, **carried(out), use_cache=True,
                    logits_to_keep=1)
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
        # Every round, as the metric's sample (its value is the median).
        "prefill_s_median": (list(prefill), "s"),
        "prefill_s_p90": (Sample(prefill).quantile(0.9), "s"),
        "decode_s_median": (list(decode), "s"),
        "decode_s_p90": (Sample(decode).quantile(0.9), "s"),
        "decode_tokens_per_s_median": ([rate / d for d in decode], "tokens/s"),
        # The rate at the p90 (slow) decode time: what 9 rounds in 10 reach or beat.
        "decode_tokens_per_s_p90": (rate / Sample(decode).quantile(0.9), "tokens/s"),
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
    from safetensors.torch import load_file, save_file  # heavy: safetensors.torch

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
    import torch  # heavy: torch

    from ..ops.load import load  # heavy: torch, transformers

    m = quant_mode(job["mode"])
    dtype = m.load_dtype(job["compute_dtype"])
    rss_before = status_bytes("VmRSS")["VmRSS"]
    reset_ok = reset_peak_rss()
    cuda.reset()
    allocated_before = torch.cuda.memory_allocated() if cuda.on else 0
    start = time.perf_counter()
    loaded = load(job["checkpoint"], None, "llava-bench", device=job["device"], dtype=dtype,
                  device_map={"": 0} if cuda.on else "auto", detect="files",
                  vision_tower=job.get("vision_tower"), vision_tower_dtype=dtype,
                  quantization_config=bnb_config(job["mode"], job["compute_dtype"]))
    cuda.sync()
    load_s = time.perf_counter() - start
    hwm = status_bytes("VmHWM")["VmHWM"] if reset_ok else None
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
    import torch  # heavy: torch
    # heavy: transformers
    import transformers  # noqa: F401  (imported here so the load time is the load's alone)

    if quant_mode(job["mode"]).quantized:
        # heavy: bitsandbytes
        import bitsandbytes  # noqa: F401

    from ..model.probe import probe_logits  # heavy: torch

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
            reset_ok = reset_peak_rss()
            cuda.reset()
            speed, more = _speed(model, loaded.image_processor, job, cuda)
            metrics |= speed | cuda.peaks("generate")
            problems += more
            if reset_ok:
                metrics["peak_rss_generate"] = (status_bytes("VmHWM")["VmHWM"] / MIB, "MiB")
            # bitsandbytes may repack weights on the first forward (on CPUs with AVX512-BF16 it
            # turns 4-bit state into bfloat16 absmax): what the model holds while it runs.
            metrics["footprint_after_generate"] = (measured_footprint(model), "B")
    cuda.close()
    return {"metrics": metrics, "problems": problems}


def child_main(job_file: str) -> None:
    """The child's whole work (launcher.launch starts it): the job from `job_file`, the
    figures to the job's `out`."""
    job = json.loads(Path(job_file).read_text())
    with quiet_third_party():
        quiet_transformers()
        result = run_child(job)
    Path(job["out"]).write_text(json.dumps(result))

