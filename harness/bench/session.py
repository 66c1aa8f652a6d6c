"""`llava-harness bench session`: everything a lent GPU machine should do, in one run.

GPU time is short (minutes, every start a bare machine), so this is the one prepared script:

1. check the machine: torch sees CUDA, bitsandbytes imports (carried as a wheel: the image has
   none), the harness's pins hold; print the environment fingerprint;
2. build real-size `llava-v1.5-7b` (safetensors) into the cache folder with the builder;
3. the GPU suites on it: `pytest suites -m gpu --llava-realsize` with the report;
4. `bench quant` on it with every mode on CUDA, with its records;
5. the records as a baseline named after the GPU, and the report, under `-o/--output`.

`--dry-run` does every step on CPU with the tiny-quant preset instead (the GPU tests then skip
with their reason, the bench runs every mode on bitsandbytes' CPU kernels), so the script is
tested wherever the harness is. Each step's wall time goes into `session.json`; a failed step
is recorded and the later steps still run, so one bad step costs no other figure.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

from ..report.environment import collect
from ..report.gate import write_baseline as write
from ..synth.cache import cache_root, cached_build
from ..synth.presets import build_spec
from .launcher import child_env
from .measure import BenchError
from .quant import QuantBench, bench_quant

GPU_MODES = ("fp16", "bf16", "int8", "nf4", "nf4-dq", "fp4")
CPU_MODES = ("fp32", "fp16", "bf16", "int8", "nf4", "nf4-dq", "fp4")
PYTEST_TIMEOUT_S = 1800


@dataclass
class Session:
    out: Path
    dry_run: bool = False
    preset: str = "llava-v1.5-7b"
    steps: list[dict] = field(default_factory=list)

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def step(self, name: str, func) -> object:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            value, error = func(), None
        except Exception as exc:  # noqa: BLE001 - a failed step is recorded, the rest still run
            value, error = None, f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(f"   failed: {error}", flush=True)
        self.steps.append({"step": name, "wall_s": round(time.perf_counter() - start, 2),
                           "ok": error is None, "error": error})
        return value


def check_machine(session: Session) -> dict:
    import torch  # heavy: torch

    if not session.dry_run and not torch.cuda.is_available():
        raise BenchError("torch sees no CUDA device (use --dry-run to rehearse on CPU)")
    # heavy: bitsandbytes
    import bitsandbytes  # noqa: F401 - carried as a wheel on the GPU image
    env = collect()
    print(f"   {env.label()}; torch {env.libraries.get('torch')}, "
          f"bitsandbytes {env.libraries.get('bitsandbytes')}, "
          f"transformers {env.libraries.get('transformers')}", flush=True)
    return env.to_dict()


def build_checkpoint(session: Session) -> Path:
    spec = build_spec(session.preset, checkpoint={"format": "safetensors"},
                      with_vision_tower=True)
    folder = cached_build(spec, cache_root())
    print(f"   {folder}", flush=True)
    return folder


def _plugin_args() -> list[str]:
    """`-p harness.plugin` where the package is used from a source tree (PYTHONPATH) rather
    than installed, so pytest finds the plugin without its entry point."""
    names = {ep.name for ep in entry_points(group="pytest11")}
    return [] if "llava_harness" in names else ["-p", "harness.plugin"]


def gpu_suites(session: Session, suites: Path) -> int:
    args = [sys.executable, "-P", "-m", "pytest", str(suites), "-q", "-p", "no:cacheprovider",
            "-m", "gpu", "--llava-report-dir", str(session.out / "reports"),
            "--llava-run-id", f"session-{session.device}", *_plugin_args()]
    if not session.dry_run:
        args.append("--llava-realsize")
    # Not launcher.launch: pytest's output goes to the terminal as it runs, and this step is
    # timed by the session, not measured; but it imports the same harness as this process.
    done = subprocess.run(args, env=child_env(), timeout=PYTEST_TIMEOUT_S)
    if done.returncode not in (0, 5):  # 5: no test selected, as on a CPU without gpu tests
        raise BenchError(f"pytest -m gpu exited {done.returncode}")
    return done.returncode


def quant_bench(session: Session, folder: Path) -> Path:
    out = session.out / f"quant-{session.device}.json"
    bench = QuantBench(checkpoint=folder, name=session.preset,
                       modes=CPU_MODES if session.dry_run else GPU_MODES,
                       device=session.device,
                       prompt_tokens=16 if session.dry_run else 64,
                       new_tokens=8 if session.dry_run else 64,
                       repeat=3 if session.dry_run else 5)
    if bench_quant(bench, out) != 0:
        raise BenchError(f"bench quant: a mode failed (records in {out})")
    return out


def baseline_name(environment: dict | None, dry_run: bool) -> str:
    """`quant-<gpu>` (e.g. quant-nvidia-h200), or `quant-cpu-<model>` for a rehearsal."""
    environment = environment or {}
    hardware = (environment.get("cpu_model") if dry_run else environment.get("gpu_name")) \
        or "unknown"
    slug = re.sub(r"[^a-z0-9]+", "-", hardware.lower()).strip("-")[:60]
    return f"quant-{'cpu-' if dry_run else ''}{slug}"


def write_baseline(session: Session, records: Path, environment: dict | None) -> Path:
    target = session.out / f"{baseline_name(environment, session.dry_run)}.json"
    return write(records, target, force=True)


def run_session(out: Path, suites: Path, dry_run: bool = False) -> int:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    session = Session(out=out, dry_run=dry_run,
                      preset="tiny-quant" if dry_run else "llava-v1.5-7b")
    environment = session.step("check the machine", lambda: check_machine(session))
    folder = session.step(f"build {session.preset} (safetensors)",
                          lambda: build_checkpoint(session))
    session.step("GPU suites (pytest -m gpu)", lambda: gpu_suites(session, suites))
    records = folder and session.step(f"bench quant on {session.device}",
                                      lambda: quant_bench(session, folder))
    if records:
        session.step("baseline", lambda: write_baseline(session, records, environment))
    summary = {"dry_run": dry_run, "preset": session.preset, "steps": session.steps,
               "environment": environment}
    (out / "session.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    for s in session.steps:
        print(f"{'ok  ' if s['ok'] else 'FAIL'} {s['wall_s']:8.1f} s  {s['step']}"
              + (f": {s['error']}" if s["error"] else ""))
    return 0 if all(s["ok"] for s in session.steps) else 1
