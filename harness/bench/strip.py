"""Strip benchmark: the streaming `strip` CLI against a naive load/filter/save of the same
folder, and against a raw copy of the output's bytes, in the same run.

Every step is a child process (harness/bench/measure.py: wall time, peak RSS, peak anonymous memory),
every step ends with its files fsynced, and every step starts cold: the input's pages are
dropped from the page cache first (`posix_fadvise(DONTNEED)` on those files only, which needs
no root and leaves other users' caches alone). All three read the same input files, so they
meet the disk in the same state. That matters: a raw copy that re-reads the freshly written
strip output instead was measured here at ~0.5-0.8x the time of one reading the input (recent
writes are still cached below the guest, on the host), which says nothing about stripping.

- naive: what a hand-written script does, shard by shard: load it whole (`torch.load`,
  weights-only; safetensors `load_file`), drop the multimodal keys by substring, save the rest
  under the same name.
- strip: `llava-harness strip` as users run it, with its strict check (the target class built
  on the meta device, overlapped with the copy); and `--no-verify`, the copy alone.
- raw copy: for each file of the strip output, `copy_file_range` of that many bytes from the
  input file of the same name: the floor for putting the output's bytes on disk. (The strip
  output is deleted first, so a round needs the disk space of one output, not two.) Rounds
  alternate which of strip and raw copy goes first.

- `--layout litgpt`: the litgpt export (one `lit_model.pth`) against a raw copy of as many
  bytes of the input shards, in order, into one file.
Goals: strip peak anonymous memory <= 300 MB; strip wall, with its strict check, <= 1.1x the
raw copy's; with --keep-legacy-buffers (shards linkable) strip wall <= 0.35x the naive
approach's.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from .measure import BenchError, Step, drop_cache, median_step, run_step

SUITE = "bench-strip"
ANON_GOAL_MB = 300
RAW_GOAL = 1.1
NAIVE_GOAL_KEEP = 0.35

_NAIVE = r"""
import json, os, sys
import torch
src, out, keep = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
names = {"bin": ("pytorch_model.bin.index.json", "pytorch_model.bin"),
         "safetensors": ("model.safetensors.index.json", "model.safetensors")}
fmt = "safetensors" if any(f.endswith(".safetensors") for f in os.listdir(src)) else "bin"
index_name, single = names[fmt]
index = os.path.join(src, index_name)
files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) \
    else [single]
drop = ("mm_projector", "vision_tower", "vision_resampler", "image_newline")
os.makedirs(out)
weight_map, total = {}, 0
for file in files:
    path = os.path.join(src, file)
    if fmt == "bin":
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        from safetensors.torch import load_file
        state = load_file(path)
    kept = {k: v for k, v in state.items() if not any(d in k for d in drop)
            and (keep or not k.endswith("rotary_emb.inv_freq"))}
    del state
    target = os.path.join(out, file)
    if fmt == "bin":
        torch.save(kept, target)
    else:
        from safetensors.torch import save_file
        save_file(kept, target, metadata={"format": "pt"})
    fd = os.open(target, os.O_RDONLY); os.fsync(fd); os.close(fd)
    weight_map.update({k: file for k in kept})
    total += sum(v.numel() * v.element_size() for v in kept.values())
    del kept
if os.path.exists(index):
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(out, index_name), "w"), indent=2, sort_keys=True)
config = json.load(open(os.path.join(src, "config.json")))
config = {k: v for k, v in config.items() if "mm_" not in k and "vision" not in k
          and not k.startswith("image_")}
config.update(model_type="llama", architectures=["LlamaForCausalLM"])
json.dump(config, open(os.path.join(out, "config.json"), "w"), indent=2)
"""

_RAW_COPY = r"""
import json, os, sys
src, sizes, dst = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
os.makedirs(dst)
for name, size in sorted(sizes.items()):
    source = os.path.join(src, name)
    b = os.open(os.path.join(dst, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    have = os.path.getsize(source) if os.path.isfile(source) else 0
    if have:
        # An output a few KB larger than its input (page-aligned records) wraps around.
        a, done = os.open(source, os.O_RDONLY), 0
        while done < size:
            done += os.copy_file_range(a, b, min(size - done, have - done % have, 1 << 30),
                                       done % have)
        os.close(a)
    else:  # no input file of that name (never a shard): the byte count is what matters
        os.write(b, bytes(size))
    os.fsync(b)
    os.close(b)
"""

# The litgpt export's floor: its one file's byte count copied from the input shards in order.
_RAW_CONCAT = r"""
import json, os, sys
src, sizes, dst = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
shards = sorted(n for n in os.listdir(src) if n.endswith((".bin", ".safetensors")))
os.makedirs(dst)
for name, size in sorted(sizes.items()):
    b = os.open(os.path.join(dst, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    done = 0
    for shard in shards:
        a = os.open(os.path.join(src, shard), os.O_RDONLY)
        left = min(os.fstat(a).st_size, size - done)
        while left > 0:
            n = os.copy_file_range(a, b, min(left, 1 << 30))
            done, left = done + n, left - n
        os.close(a)
    if done < size:
        os.write(b, bytes(size - done))
    os.fsync(b)
    os.close(b)
"""


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _read_all(folder: Path) -> None:
    """Read every file once (untimed), so every step follows a full read of the input."""
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with open(path, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def _need_space(work: Path, nbytes: int) -> None:
    free = shutil.disk_usage(work).free
    if free < nbytes + 2 * 2**30:
        raise BenchError(f"{work}: {free / 1e9:.1f} GB free, the next step writes "
                         f"{nbytes / 1e9:.1f} GB (plus 2 GiB headroom)")


def _strip(src: Path, out: Path, keep: bool, verify: bool, layout: str = "hf"
           ) -> tuple[Step, dict[str, int]]:
    """One strip from a cold cache; returns its step and the output's file sizes."""
    drop_cache(src)
    cmd = [sys.executable, "-m", "harness.cli", "strip", str(src), "-o", str(out)]
    if layout == "litgpt":
        cmd += ["--layout", "litgpt"]
    cmd += ([] if verify else ["--no-verify"]) + (["--keep-legacy-buffers"] if keep else [])
    try:
        stripped = run_step("strip" if verify else "strip --no-verify", cmd)
        return stripped, {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _raw(src: Path, out: Path, sizes: dict[str, int], layout: str = "hf") -> Step:
    drop_cache(src)
    script = _RAW_CONCAT if layout == "litgpt" else _RAW_COPY
    if layout == "litgpt":  # the big file only: config and tokenizer are noise
        sizes = {name: n for name, n in sizes.items() if name.endswith(".pth")}
    try:
        return run_step("raw copy", [sys.executable, "-c", script, str(src), json.dumps(sizes),
                                 str(out)])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _round(src: Path, work: Path, keep: bool, naive: bool, sizes: dict[str, int] | None,
           raw_first: bool, layout: str = "hf") -> tuple[dict[str, Step], dict[str, int]]:
    """One round. Odd rounds copy before they strip (with the sizes an earlier round's strip
    wrote), so neither step always follows the other's reading of the input. A litgpt
    export has no --no-verify (its check reads headers only) and no naive counterpart."""
    size = _folder_bytes(src)
    _need_space(work, size)
    steps = {}
    if raw_first and sizes:
        steps["raw"] = _raw(src, work / "raw-copy", sizes, layout)
    steps["strip"], sizes = _strip(src, work / "strip", keep, verify=True, layout=layout)
    if layout == "hf":
        steps["copy"], _ = _strip(src, work / "strip", keep, verify=False)
    if "raw" not in steps:
        steps["raw"] = _raw(src, work / "raw-copy", sizes, layout)
    naive = naive and layout == "hf"
    if naive:
        out = work / "naive"
        drop_cache(src)
        try:
            steps["naive"] = run_step("naive", [sys.executable, "-c", _NAIVE, str(src), str(out),
                                            "1" if keep else "0"])
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return steps, sizes


def measure(src: Path, work: Path, keep: bool, repeat: int, naive: bool,
            layout: str = "hf") -> dict:
    _read_all(src)
    rounds, sizes = [], None
    for i in range(repeat):
        steps, sizes = _round(src, work, keep, naive, sizes, raw_first=i % 2 == 1,
                              layout=layout)
        rounds.append(steps)
    steps = {name: median_step(rounds, name) for name in ("naive", "strip", "copy", "raw")}
    figures = {"steps": {k: v for k, v in steps.items() if v is not None}, "rounds": repeat,
               "bytes": _folder_bytes(src),
               # every round's wall time per step, for the records' samples
               "wall_rounds": {name: [r[name].wall_s for r in rounds if name in r]
                               for name in steps if steps[name] is not None}}
    strip = steps["strip"]
    figures["strip_over_raw"] = strip.wall_s / steps["raw"].wall_s
    if steps["copy"] is not None:
        figures["copy_over_raw"] = steps["copy"].wall_s / steps["raw"].wall_s
    if steps["naive"] is not None:
        figures["strip_over_naive"] = strip.wall_s / steps["naive"].wall_s
    return figures


def goals(f: dict, keep: bool) -> list[tuple[str, float, float]]:
    """(what, measured, goal) for each goal this case has; all read 'measured <= goal'."""
    out = [("strip peak anonymous memory, MB", f["steps"]["strip"].peak_anon_mb, ANON_GOAL_MB),
           ("strip wall (with its strict check) / raw copy wall", f["strip_over_raw"],
            RAW_GOAL)]
    if keep and "strip_over_naive" in f:
        out.append(("strip wall / naive wall", f["strip_over_naive"], NAIVE_GOAL_KEEP))
    return out


def record(case: str, f: dict, keep: bool):
    from ..report.results import make_record

    metrics = {"bytes": (f["bytes"], "B")}
    for name, step in f["steps"].items():
        metrics |= {f"{name}_wall_s": (f.get("wall_rounds", {}).get(name) or step.wall_s, "s"),
                    f"{name}_peak_rss": (step.peak_rss_mb, "MB"),
                    f"{name}_peak_anon": (step.peak_anon_mb, "MB")}
    metrics["strip_over_raw"] = (f["strip_over_raw"], "ratio", "lower")
    if "copy_over_raw" in f:
        metrics["copy_over_raw"] = (f["copy_over_raw"], "ratio", "lower")
    if "strip_over_naive" in f:
        metrics["strip_over_naive"] = (f["strip_over_naive"], "ratio", "lower")
    missed = [what for what, value, goal in goals(f, keep) if value > goal]
    return make_record(SUITE, case, metrics, outcome="failed" if missed else "passed",
                       reason=f"missed: {'; '.join(missed)}" if missed else None)


def _print(case: str, src: Path, f: dict, keep: bool) -> None:
    from tabulate import tabulate

    labels = {"naive": "naive load/filter/save", "strip": "strip (with its strict check)"
              if "litgpt" not in case else "strip --layout litgpt (with its key/shape check)",
              "copy": "strip --no-verify (the copy alone)",
              "raw": "raw copy of the output's bytes"}
    rows = [[labels[n], f"{s.wall_s:.1f}", f"{s.peak_rss_mb:.0f}", f"{s.peak_anon_mb:.0f}"]
            for n, s in f["steps"].items()]
    print(f"\n{case}: {src} ({f['bytes'] / 1e9:.2f} GB, median of {f['rounds']} round(s), "
          "each step from a cold page cache)")
    print(tabulate(rows, headers=["step", "wall s", "peak RSS MB", "peak anon MB"],
                   tablefmt="github"))
    for what, value, goal in goals(f, keep):
        print(f"{what}: {value:.3f} (goal <= {goal}: {'met' if value <= goal else 'MISSED'})")


def bench_strip(folders: list[tuple[Path, str]], keeps: tuple[bool, ...], repeat: int,
                work: Path | None, naive: bool, out: Path | None, layout: str = "hf") -> int:
    records = []
    for src, name in folders:
        where = Path(work) if work else src.parent
        where.mkdir(parents=True, exist_ok=True)
        scratch = where / f".bench-strip-{os.getpid()}"
        scratch.mkdir()
        try:
            for keep in keeps if layout == "hf" else (False,):
                case = f"{name}-{'keep' if keep else 'drop'}-legacy" if layout == "hf" \
                    else f"{name}-litgpt"
                try:
                    figures = measure(src, scratch, keep, repeat, naive, layout)
                except BenchError as exc:  # record it and go on with the other cases
                    print(f"\n{case}: {exc}", file=sys.stderr)
                    records.append(_error_record(case, str(exc)))
                    continue
                _print(case, src, figures, keep)
                records.append(record(case, figures, keep))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if out:
        from ..report.results import save_records

        save_records(records, out)
        if out != "-":
            print(f"\nfigures written to {out}")
    return 1 if any(r.outcome == "error" for r in records) else 0


def _error_record(case: str, reason: str):
    from ..report.results import make_record

    return make_record(SUITE, case, outcome="error", reason=reason)
