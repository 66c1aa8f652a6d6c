"""The live oracle: LLaVA's code computes it on this machine, the harness caches it.

`compute()` builds the tiny checkpoints with the harness builder (or takes folders already
built), writes a plan, runs `compute.py` in the oracle environment, and assembles the result
into the same folder format as the stored fixtures (`manifest.json`, `images.safetensors`,
`cases/`). A result is reused only when everything it depends on is unchanged: the
checkpoints' identity, the cases, the oracle environment, the computing script, and this
machine's numeric fingerprint (CPU, ISA, torch's kernels and threads) — so a cache folder
shared between machines never hands one CPU's arithmetic to another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..checkpoint.atomic import atomic_dir
from ..checkpoint.identity import folder_identity
from ..report.environment import numeric_fingerprint
from ..synth.cache import cache_lock
from ..synth.presets import build_spec
from . import cases
from .venv import OracleEnv, OracleEnvError, clean_env, oracle_root, require_env

FORMAT_VERSION = 4  # 3: LLaVA-1.6 (anyres) cases; 4: checkpoint identity, not file hashes
MANIFEST = "manifest.json"
COMPUTE_SCRIPT = Path(__file__).with_name("compute.py")
COMPUTE_TIMEOUT_S = 900


class OracleComputeError(OracleEnvError):
    """LLaVA's code failed to compute the oracle."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def spec_of(entry: dict):
    return build_spec(entry["preset"], model=entry["model"], checkpoint=entry["checkpoint"])


def build_checkpoints(root: Path) -> dict[str, Path]:
    from ..synth.builder import build  # heavy: torch

    folders = {}
    for entry in cases.checkpoints():
        folders[entry["id"]] = root / entry["id"]
        build(spec_of(entry), folders[entry["id"]], force=True)
    return folders


def result_key(env: OracleEnv, identities: dict, fingerprint: dict) -> str:
    payload = json.dumps({"format": FORMAT_VERSION, "env": env.info()["key"],
                          "script": sha256(COMPUTE_SCRIPT), "checkpoints": identities,
                          "cases": cases.checkpoints(), "inputs": cases.INPUTS,
                          "next_inputs": cases.NEXT_INPUTS, "images": cases.image_sizes(),
                          "machine": fingerprint}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _write_images(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in cases.image_sizes():
        paths[name] = str(folder / f"{name}.png")
        cases.make_image(name).save(paths[name])  # PNG: lossless, the pixels exactly
    return paths


def _run_compute(env: OracleEnv, plan: dict, work: Path) -> None:
    plan_path = work / "plan.json"
    plan_path.write_text(json.dumps(plan, indent=2))
    try:
        done = subprocess.run([str(env.python), "-I", str(COMPUTE_SCRIPT), str(plan_path)],
                              capture_output=True, text=True, env=clean_env(), cwd=work,
                              timeout=COMPUTE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise OracleComputeError(f"oracle compute: LLaVA's code took over "
                                 f"{COMPUTE_TIMEOUT_S} s") from None
    if done.returncode != 0:
        last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()),
                    f"exit code {done.returncode}")
        raise OracleComputeError(f"oracle compute: LLaVA's code failed: {last.strip()}")


def _manifest(computed: dict, identities: dict, fingerprint: dict, env: OracleEnv,
              seconds: float) -> dict:
    checkpoints = {}
    for entry in cases.checkpoints():
        checkpoints[entry["id"]] = {
            "id": entry["id"], "build": {k: entry[k] for k in ("preset", "model", "checkpoint")},
            "spec": dataclasses.asdict(spec_of(entry)), "identity": identities[entry["id"]]}
    return {
        "format_version": FORMAT_VERSION,
        "what": "logits and intermediates computed by haotian-liu/LLaVA's released code "
                "(the llava-torch wheel) on CPU",
        "llava": {"package": computed["environment"]["llava-torch"],
                  "source": "the llava-torch wheel from the package index, unmodified"},
        "environment": computed["environment"],
        "computed_on": fingerprint,
        "compute_seconds": round(seconds, 1),
        "oracle_env": {"key": env.info()["key"], "requirements": env.info()["requirements"]},
        "image_token_index": cases.IMAGE_TOKEN_INDEX,
        "inputs": cases.INPUTS,
        "next_inputs": cases.NEXT_INPUTS,
        "images": {"recipe": cases.IMAGE_RECIPE,
                   "sizes_wh": {k: list(v) for k, v in cases.image_sizes().items()},
                   **computed["images"]},
        "anyres_choices": computed["anyres_choices"],
        "checkpoints": checkpoints,
        "main_case": cases.MAIN_CASE,
        "cases": computed["cases"],
        "failures": computed["failures"],
    }


def compute(out: Path, folders: dict[str, Path] | None = None, env: OracleEnv | None = None,
            force: bool = False, identities: dict | None = None) -> Path:
    """Compute the oracle into `out` (atomically) with LLaVA's code on this machine;
    `identities`, when the caller has them, are the `folders`' identities."""
    env = require_env(env)
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="llava-oracle-") as tmp:
        work = Path(tmp)
        if folders is None:
            folders, identities = build_checkpoints(work / "ckpt"), None
        identities = identities or {cid: folder_identity(folders[cid]) for cid in folders}
        fingerprint = numeric_fingerprint()
        with atomic_dir(out, force=force) as staging:
            plan = {"out": str(staging), "scratch": str(work / "scratch"),
                    "checkpoints": {k: str(v) for k, v in folders.items()},
                    "cases": cases.CASES, "bases": cases.BASES, "main_case": cases.MAIN_CASE,
                    "next_cases": cases.NEXT_CASES, "next_inputs": cases.NEXT_INPUTS,
                    "next_lpm_source": cases.NEXT_LPM_SOURCE,
                    "next_images": list(cases.NEXT_IMAGE_SIZES),
                    "next_pinpoints": cases.next_pinpoints(),
                    "next_crop_side": cases.next_crop_side(),
                    "mistral_lpm_source": cases.MISTRAL_LPM_SOURCE, "inputs": cases.INPUTS,
                    "images": _write_images(work / "images")}
            start = time.perf_counter()
            _run_compute(env, plan, work)
            computed = json.loads((staging / "computed.json").read_text())
            (staging / "computed.json").unlink()
            manifest = _manifest(computed, identities, fingerprint, env,
                                 time.perf_counter() - start)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def cached(folders: dict[str, Path] | None = None, env: OracleEnv | None = None) -> Path:
    """The live oracle for this machine from the cache, computed first when missing."""
    env = require_env(env)
    with tempfile.TemporaryDirectory(prefix="llava-oracle-") as tmp:
        if folders is None:
            folders = build_checkpoints(Path(tmp) / "ckpt")
        identities = {cid: folder_identity(folders[cid]) for cid in folders}
        folder = oracle_root() / f"live-{result_key(env, identities, numeric_fingerprint())}"
        if not (folder / MANIFEST).is_file():
            with cache_lock(folder):  # one process computes; the others wait and reuse it
                if not (folder / MANIFEST).is_file():
                    shutil.rmtree(folder, ignore_errors=True)
                    compute(folder, folders, env, identities=identities)
    return folder
