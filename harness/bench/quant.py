"""Quantized-load benchmark: memory and speed per mode, each mode in a fresh process.

A fresh process per mode keeps one mode's allocations, caches and allocator state from
inflating another's. The parent builds the model's skeleton on the meta device (no weights)
for the theoretical footprint, runs the reference mode first (fp32 on CPU, fp16 on CUDA) so
its probe logits are on disk for the others' drift, then one child per mode. Each child writes
its figures as JSON; the parent adds the child's wall time and peak RSS, checks them against
theory and the goal, prints a table and writes records (harness.report.results schema).

This module is the parent's side (the bench's settings, the orchestration, the checks against
theory, the table and records); what runs in each child is harness/bench/quant_child.py.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..model.config import read_config_json
from ..ops.quant import (cpu_4bit_problem, parts_from_config, parts_from_folder,
                         theoretical_footprint)
from ..ops.quant import mode as quant_mode
from ..report.environment import current
from ..report.results import Results, make_record, new_run_id, now, write_results
from ..synth import configs
from ..synth.layout import clip_vision_config
from ..tolerances import tolerance
from .launcher import launch
from .measure import MIB, BenchError
from .quant_child import child_main

SUITE = "bench-quant"
# The goal: NF4 with double quant peaks at load within 10% of the theoretical footprint.
GOALS = {"nf4-dq": 1.10}
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
            raise BenchError(f"device {self.device!r}: expected cpu or cuda")
        if self.new_tokens < 2:
            raise BenchError(f"new tokens {self.new_tokens}: decode needs at least 2 (the "
                                  "first token comes with the prefill)")
        for name in self.modes:
            quant_mode(name)
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise BenchError(f"modes {self.modes}: expected distinct modes, at least one")

    @property
    def reference_mode(self) -> str:
        """The drift reference: fp32 on CPU; fp16 on CUDA (the published dtype)."""
        return "fp16" if self.device == "cuda" else "fp32"

    def case(self, mode: str) -> str:
        return f"{self.name}-{mode}-{self.device}"


@dataclass(frozen=True)
class ModeResult:
    mode: str
    metrics: dict
    problems: list
    error: str | None = None


def _check_lengths(bench: QuantBench) -> None:
    """Prompt + image patches + new tokens must fit the positions and the splice's
    truncation length, or the figures would be for a truncated prompt."""
    from transformers import CLIPVisionConfig  # heavy: transformers

    config = read_config_json(bench.checkpoint)
    tower = bench.vision_tower or Path(config.get("mm_vision_tower") or "")
    vision = CLIPVisionConfig.from_pretrained(tower)
    patches = (vision.image_size // vision.patch_size) ** 2
    need = bench.prompt_tokens + 1 + patches + bench.new_tokens
    limits = {name: config.get(name) for name in ("max_position_embeddings",
                                                  "tokenizer_model_max_length")}
    for name, limit in limits.items():
        if limit and need > limit:
            raise BenchError(f"{bench.checkpoint}/config.json: {name} {limit} < prompt "
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
    measured = launch(child_main, str(spec),
                      env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if measured.returncode:
        lines = [x for x in measured.stderr.strip().splitlines() if x.strip()]
        return ModeResult(job["mode"], {}, [], lines[-1] if lines else
                          f"exit {measured.returncode}, no output")
    result = json.loads(Path(job["out"]).read_text())
    metrics = {k: tuple(v) for k, v in result["metrics"].items()}
    metrics["process_wall_s"] = (measured.wall_s, "s")
    metrics["process_peak_rss"] = (measured.peak_rss_bytes / MIB, "MiB")
    return ModeResult(job["mode"], metrics, result["problems"])


def with_theory(result: ModeResult, bench: QuantBench, parts) -> tuple[dict, list[str]]:
    """The child's figures plus theory, ratios and the goal check."""
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
        raise BenchError(f"reference {bench.reference_mode} failed: {ref.error}")


def run(bench: QuantBench):
    """Every mode of `bench`, reference first; returns the records in mode order."""
    parts = parts_from_folder(bench.checkpoint, bench.vision_tower)
    _check_lengths(bench)
    order = sorted(bench.modes, key=lambda name: name != bench.reference_mode)
    skips = {name: cpu_4bit_problem(parts.linears) if bench.device == "cpu"
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
    from tabulate import tabulate  # heavy: tabulate

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
        if out != "-":
            print(f"records written to {out}")
    return 1 if any(r.outcome in ("failed", "error") for r in records) else 0


def parts_from_spec(model):
    """Parts of the model a ModelSpec describes (a preset's, say), from its config alone: the
    builder's config and tower config, counted by the operation."""
    return parts_from_config(configs.llava_config_json(model, model.vision.tower_name),
                             clip_vision_config(model.vision))
