"""Merge benchmark: the streamed `merge-lora` on a real-size checkpoint, wall time and memory.

A synthetic adapter of the requested rank is written first (random A/B of the base's shapes,
saved the peft way; its build time is reported apart). The merge then runs as a child process
(`llava-harness merge-lora`), so only its own imports and work count; wall time, peak RSS and
peak anonymous memory come from the launcher (RSS includes the page cache of mmap'd input
shards, anonymous memory is what the process really holds). The output is spot-checked: the
first and last adapted weights against an independent float32 formula, bit for bit, and an
untouched tensor against the base.

`--naive` adds LLaVA's own way for comparison (naive_merge.load_all_merge: load the whole base
in the merge dtype, load the trainables, `PeftModel.from_pretrained(...).merge_and_unload()`,
`save_pretrained`), only when the machine has the memory for it; otherwise its peak is
estimated (model + float32 adapter, as peft upcasts it) and reported as an estimate.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from ..checkpoint.reader import open_folder
from ..report.results import make_record, save_records
from .launcher import launch, launch_cli
from .measure import BenchError, checked_figures
from .naive_merge import load_all_merge

SUITE = "bench-merge"
# Headroom over the estimated peak before the naive child is started on a shared machine.
NAIVE_HEADROOM = 1.25

@dataclass(frozen=True)
class MergeBench:
    base: Path
    case: str
    rank: int = 128
    alpha: int = 256
    targets: str = "all-linear"
    dtype: str = "bfloat16"
    device: str = "cpu"
    work: Path | None = None
    naive: bool = False


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _check_disk(work: Path, need: int) -> None:
    free = shutil.disk_usage(work).free
    if free < need:
        raise BenchError(f"{work}: {free / 2**30:.1f} GiB free, the benchmark needs "
                         f"{need / 2**30:.1f} GiB")


def spot_check(base: Path, adapter: Path, merged: Path, dtype: str) -> list[str]:
    """Problems (empty: none) in the first and last adapted weights, recomputed as
    dtype(float32(W in dtype) + s * float32(B) @ float32(A)), and in one untouched tensor."""
    import torch  # heavy: torch

    from ..ops.adapter import AdapterConfig  # heavy: torch

    cfg = AdapterConfig.read(adapter)
    src, out = open_folder(base), open_folder(merged)
    target = getattr(torch, dtype)
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as f:
        names = f.keys()  # a safe_open handle is not iterable itself
        modules = sorted({k.rsplit(".lora_", 1)[0] for k in names})
        problems = []
        for module in (modules[0], modules[-1]):
            key = module.removeprefix("base_model.model.") + ".weight"
            _, scaling = cfg.rank_and_scaling(key.removesuffix(".weight"))
            a, b = f.get_tensor(module + ".lora_A.weight"), f.get_tensor(module + ".lora_B.weight")
            w = src.read([key])[key].to(target)
            expected = (w.float() + (b.float() @ a.float()) * scaling).to(target)
            if not torch.equal(out.read([key])[key], expected):
                problems.append(f"{key}: merged tensor differs from W + s * B @ A")
    key = "model.embed_tokens.weight"
    if not torch.equal(out.read([key])[key], src.read([key])[key].to(target)):
        problems.append(f"{key}: changed, but no adapter targets it")
    return problems


def _naive_estimate(base: Path, adapter_bytes_fp32: int, dtype: str) -> int:
    numel = sum(m.numel for m in open_folder(base).tensors.values())
    return numel * (4 if dtype == "float32" else 2) + adapter_bytes_fp32


def _run(bench: MergeBench, work: Path) -> dict:
    import torch  # heavy: torch

    from ..ops.lora import LoraSpec, synthetic_adapter  # heavy: torch

    model_bytes = sum(m.nbytes for m in open_folder(bench.base).tensors.values())
    _check_disk(work, int(model_bytes * (2.2 if bench.naive else 1.2)))
    spec = LoraSpec(r=bench.rank, alpha=bench.alpha, targets=bench.targets)
    start = time.perf_counter()
    adapter = synthetic_adapter(bench.base, work / "adapter", spec, torch.bfloat16)
    figures = {"adapter_build_s": time.perf_counter() - start, "model_bytes": model_bytes,
               "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size}
    stats = work / "merge.json"
    measured, summary = checked_figures("merge-lora", launch_cli(
        "merge-lora", "--adapter", str(adapter), "--base", str(bench.base), "-o",
        str(work / "merged"), "--dtype", bench.dtype, "--device", bench.device, "--json",
        stdout=stats), stats)
    figures |= {"wall_s": measured.wall_s, "work_s": summary["work_s"],
                "peak_rss": measured.peak_rss_bytes, "peak_anon": measured.peak_anon_bytes or 0,
                "merged_layers": summary["merged_layers"], "output_bytes": summary["bytes"]}
    figures["problems"] = spot_check(bench.base, adapter, work / "merged", bench.dtype)
    shutil.rmtree(work / "merged")
    estimate = _naive_estimate(bench.base, figures["adapter_bytes"] * 2, bench.dtype)
    figures["naive_estimate"] = estimate
    if bench.naive:
        figures |= _run_naive(bench, adapter, work, estimate)
    return figures


def _run_naive(bench: MergeBench, adapter: Path, work: Path, estimate: int) -> dict:
    available = _mem_available()
    if available < estimate * NAIVE_HEADROOM:
        return {"naive_skipped": f"needs ~{estimate / 2**30:.1f} GiB (+{NAIVE_HEADROOM - 1:.0%}"
                                 f" headroom), {available / 2**30:.1f} GiB available"}
    stats = work / "naive.json"
    measured, naive = checked_figures("naive merge", launch(
        load_all_merge, str(adapter), str(bench.base), str(work / "naive"), bench.dtype,
        str(stats)), stats)
    shutil.rmtree(work / "naive", ignore_errors=True)
    return {"naive_wall_s": measured.wall_s, "naive_work_s": naive["work_s"],
            "naive_peak_rss": measured.peak_rss_bytes,
            "naive_peak_anon": measured.peak_anon_bytes or 0}


def measure(bench: MergeBench) -> dict:
    """Run the benchmark in `bench.work` (or a temporary folder beside the base), leaving
    nothing behind in either."""
    own = bench.work is None
    work = Path(tempfile.mkdtemp(prefix=".llava-bench-merge-", dir=bench.base.parent)) if own \
        else Path(bench.work)
    if not own:
        work.mkdir(parents=True, exist_ok=True)
        clashes = [work / n for n in ("adapter", "merged", "naive") if (work / n).exists()]
        if clashes:
            raise BenchError(f"{clashes[0]}: exists; give an empty --work folder")
    try:
        return _run(bench, work)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for name in ("adapter", "merged", "naive", "merge.json", "naive.json"):
                path = work / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def records(bench: MergeBench, f: dict) -> list:
    mib = 2**20
    metrics = {"merge_wall_s": (f["wall_s"], "s"), "merge_work_s": (f["work_s"], "s"),
               "peak_rss": (f["peak_rss"] / mib, "MiB"),
               "peak_anon": (f["peak_anon"] / mib, "MiB"),
               "adapter_build_s": (f["adapter_build_s"], "s"),
               "model_bytes": (f["model_bytes"], "bytes", "none"),
               "adapter_bytes": (f["adapter_bytes"], "bytes", "none"),
               "merged_layers": (f["merged_layers"], "count", "none"),
               "naive_peak_estimate": (f["naive_estimate"] / mib, "MiB", "none")}
    if "naive_wall_s" in f:
        metrics |= {"naive_wall_s": (f["naive_wall_s"], "s"),
                    "naive_work_s": (f["naive_work_s"], "s"),
                    "naive_peak_rss": (f["naive_peak_rss"] / mib, "MiB"),
                    "naive_peak_anon": (f["naive_peak_anon"] / mib, "MiB")}
    case = (f"{bench.case}-r{bench.rank}-a{bench.alpha}-{bench.targets}-{bench.dtype}"
            f"-{bench.device}")
    problems = f["problems"]
    return [make_record(SUITE, case, metrics, outcome="failed" if problems else "passed",
                        reason="; ".join(problems) or None)]


def bench_merge(bench: MergeBench, out: Path | None) -> int:
    from tabulate import tabulate  # heavy: tabulate

    f = measure(bench)
    gib = 2**30
    rows = [["streamed merge-lora", f"{f['wall_s']:.1f}", f"{f['work_s']:.1f}",
             f"{f['peak_rss'] / gib:.2f}", f"{f['peak_anon'] / gib:.2f}"]]
    if "naive_wall_s" in f:
        rows.append(["load all + merge_and_unload + save", f"{f['naive_wall_s']:.1f}",
                     f"{f['naive_work_s']:.1f}", f"{f['naive_peak_rss'] / gib:.2f}",
                     f"{f['naive_peak_anon'] / gib:.2f}"])
    print(f"{bench.case}: rank {bench.rank}, alpha {bench.alpha}, {bench.targets}, "
          f"{bench.dtype} on {bench.device}; {f['merged_layers']} layers, adapter "
          f"{f['adapter_bytes'] / gib:.2f} GiB (built in {f['adapter_build_s']:.1f} s)")
    print(tabulate(rows, headers=["step", "wall s", "work s", "peak RSS GiB", "peak anon GiB"],
                   tablefmt="github"))
    if "naive_wall_s" not in f:
        why = f.get("naive_skipped", "not run (--naive)")
        print(f"\nLLaVA's way (load everything): {why}; estimated peak "
              f"{f['naive_estimate'] / gib:.1f} GiB (model in {bench.dtype} + float32 adapter)")
    print("spot check: " + ("; ".join(f["problems"]) or "merged tensors bit-identical to "
                                                        "W + s * B @ A"))
    if out:
        save_records(records(bench, f), out)
        if out != "-":
            print(f"figures written to {out}")
    return 1 if f["problems"] else 0
