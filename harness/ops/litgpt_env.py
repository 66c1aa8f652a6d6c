"""litgpt in an environment of its own, to load an export the way litgpt users do.

`import litgpt` pulls lightning (its package `__init__` imports the high-level API), so the
minimal set that makes `litgpt.GPT` and `litgpt.Config` importable goes in with `--no-deps`,
pinned, after this environment's own torch: found by installing litgpt alone and adding what
each import asked for. It lives in `$LLAVA_HARNESS_CACHE/litgpt/env-<key>/` (never
site-packages), keyed by the list and the Python and torch versions, and counts as made only
once `ready.json` is written, last. The export itself never needs litgpt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from ..errors import HarnessError
from ..data import cache_root

LITGPT = "litgpt==0.5.13"
PINNED = (LITGPT, "lightning==2.6.6", "lightning-utilities==0.15.3", "torchmetrics==1.9.0",
          "pyyaml==6.0.4", "typing-extensions==4.16.0", "packaging==26.4", "numpy==2.4.6",
          "tqdm==4.70.1", "safetensors==0.8.0", "psutil==7.2.2")
READY = "ready.json"
SMOKE = "from litgpt import GPT, Config"
TIMEOUT_S = 1800


class LitgptEnvError(HarnessError):
    """The litgpt environment is missing or could not be made."""


def torch_requirement() -> str:
    return f"torch=={metadata.version('torch').split('+')[0]}"


def env_folder() -> Path:
    payload = json.dumps({"python": sys.version_info[:2], "torch": torch_requirement(),
                          "packages": PINNED})
    return cache_root() / "litgpt" / f"env-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def python() -> Path | None:
    """The environment's interpreter, or None when it is not made."""
    folder = env_folder()
    exe = folder / "bin" / "python"
    return exe if (folder / READY).is_file() and exe.exists() else None


def child_env() -> dict[str, str]:
    """Offline, with nothing of this environment's paths on its own."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _step(argv: list, what: str) -> str:
    try:
        done = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                              env=child_env(), timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise LitgptEnvError(f"litgpt setup: {what} took over {TIMEOUT_S} s") from None
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()] or ["?"]
        raise LitgptEnvError(f"litgpt setup: {what} failed: {lines[-1].strip()}")
    return done.stdout


def setup(force: bool = False, log=print) -> Path:
    """Make (or reuse) the environment; returns its interpreter."""
    if python() is not None and not force:
        log(f"litgpt environment ready at {env_folder()}")
        return python()
    folder = env_folder()
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    exe = folder / "bin" / "python"
    try:
        log(f"creating the litgpt environment at {folder}")
        _step([sys._base_executable, "-m", "venv", folder], "creating the venv")
        pip = [exe, "-m", "pip", "install", "--quiet"]
        _step([*pip, torch_requirement()], f"installing {torch_requirement()}")
        _step([*pip, "--no-deps", *PINNED], f"installing {LITGPT} and its pins")
        _step([exe, "-I", "-c", SMOKE], "importing litgpt.GPT")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # never a half-made environment
        raise
    (folder / READY).write_text(json.dumps({"torch": torch_requirement(),
                                            "packages": PINNED}, indent=2) + "\n")
    log(f"litgpt environment ready at {folder}")
    return exe


# Run by path inside the litgpt environment: litgpt loads the export and saves its logits.
CHILD_SCRIPT = Path(__file__).with_name("litgpt_child.py")


def litgpt_logits(folder: Path, ids: list[int], out: Path):
    """litgpt's GPT on an export, in the litgpt environment: the logits tensor."""
    import torch  # heavy: torch

    exe = python()
    if exe is None:
        raise LitgptEnvError(f"{env_folder()}: the litgpt environment is not made; run "
                             "'llava-harness litgpt setup'")
    _step([exe, "-I", CHILD_SCRIPT, folder, ",".join(map(str, ids)), out],
          f"litgpt.GPT on {folder}")
    return torch.load(out, weights_only=True)
