"""The oracle's Python environment: LLaVA's released wheel under its own pinned libraries.

`llava-torch` pins torch 2.0.1 and a dozen serving packages the oracle never imports, so every
package goes in with `--no-deps` from an explicit list; torch itself is the main
environment's version (its kernels are what make two computations on one machine agree bit
for bit). The environment lives in the user's cache folder (`$LLAVA_HARNESS_CACHE/oracle/`,
never site-packages or a checkout), keyed by the list below and the Python and torch
versions, and counts as set up only once `ready.json` is written, last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..errors import HarnessError
from ..synth.cache import cache_root

LLAVA = "llava-torch==1.2.2.post1"
# LLaVA's own pins (its pyproject) where they still install offline, then the plain
# dependencies of those packages, which --no-deps leaves for us to name.
PINNED = (LLAVA, "transformers==4.37.2", "tokenizers==0.15.1", "sentencepiece==0.1.99",
          "accelerate==0.21.0", "peft==0.10.0", "huggingface_hub==0.36.2", "numpy==1.26.4")
PLAIN = ("protobuf", "einops", "shortuuid", "filelock", "fsspec", "packaging", "pyyaml", "regex",
         "requests", "urllib3", "idna", "charset-normalizer", "certifi", "tqdm", "psutil")
# Same version as the main environment: pillow makes the pixels, safetensors reads and writes
# the tensors on both sides.
SAME_AS_MAIN = ("pillow", "safetensors")
READY = "ready.json"
PIP_TIMEOUT_S = 1800


class OracleError(HarnessError):
    """The one base of harness/oracle/'s errors: the oracle cannot answer."""


class OracleEnvError(OracleError):
    """The oracle environment is missing or could not be made."""


def _main_version(dist: str) -> str:
    try:
        return metadata.version(dist).split("+")[0]
    except metadata.PackageNotFoundError:
        raise OracleEnvError(f"{dist} is not installed in this environment") from None


def requirements() -> list[str]:
    """Everything installed with --no-deps after torch, pinned where it matters."""
    return [*PINNED, *(f"{d}=={_main_version(d)}" for d in SAME_AS_MAIN), *PLAIN]


def torch_requirement() -> str:
    return f"torch=={_main_version('torch')}"


def env_key() -> str:
    payload = json.dumps({"python": sys.version_info[:2], "torch": torch_requirement(),
                          "packages": requirements()})
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def oracle_root() -> Path:
    return cache_root() / "oracle"


@dataclass(frozen=True)
class OracleEnv:
    folder: Path

    @property
    def python(self) -> Path:
        return self.folder / "bin" / "python"

    def is_ready(self) -> bool:
        return (self.folder / READY).is_file() and self.python.exists()

    def info(self) -> dict:
        return json.loads((self.folder / READY).read_text())


def default_env() -> OracleEnv:
    return OracleEnv(oracle_root() / f"env-{env_key()}")


def require_env(env: OracleEnv | None = None) -> OracleEnv:
    env = env or default_env()
    if not env.is_ready():
        raise OracleEnvError(f"{env.folder}: the oracle environment is not set up; run "
                             "'llava-harness oracle setup' (installs LLaVA's wheel and its "
                             "pinned libraries from the package index, about 30 s)")
    return env


def clean_env() -> dict[str, str]:
    """The process environment for the oracle's interpreter: offline, nothing of ours on its
    path (the main environment's PYTHONPATH or user site would shadow its pins)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONNOUSERSITE="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _run(args: list, what: str, timeout: float = PIP_TIMEOUT_S) -> str:
    try:
        done = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                              env=clean_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise OracleEnvError(f"oracle setup: {what} took over {timeout:.0f} s") from None
    if done.returncode != 0:
        last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()),
                    f"exit code {done.returncode}")
        raise OracleEnvError(f"oracle setup: {what} failed: {last.strip()}")
    return done.stdout


# LLaVA's `llava/model/__init__.py` swallows import errors, so import the classes directly.
SMOKE = ("import llava.model.builder, llava.mm_utils; "
         "from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM; "
         "from llava.model.language_model.llava_mistral import LlavaMistralForCausalLM")


def setup(env: OracleEnv | None = None, force: bool = False, log=print) -> OracleEnv:
    """Create (or reuse) the oracle environment; returns it ready."""
    env = env or default_env()
    if env.is_ready() and not force:
        log(f"oracle environment ready at {env.folder}")
        return env
    shutil.rmtree(env.folder, ignore_errors=True)
    env.folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        log(f"creating the oracle environment at {env.folder}")
        _run([sys._base_executable, "-m", "venv", env.folder], "creating the venv", 300)
        pip = [env.python, "-m", "pip", "install", "--quiet"]
        _run([*pip, torch_requirement()], f"installing {torch_requirement()}")
        _run([*pip, "--no-deps", *requirements()], f"installing {LLAVA} and its pins")
        _run([env.python, "-I", "-c", SMOKE], "importing LLaVA's model classes", 300)
        freeze = _run([env.python, "-m", "pip", "freeze"], "listing the packages", 300)
    except BaseException:
        shutil.rmtree(env.folder, ignore_errors=True)  # never leave a half-made environment
        raise
    (env.folder / READY).write_text(json.dumps(
        {"key": env_key(), "torch": torch_requirement(), "requirements": requirements(),
         "freeze": freeze.split()}, indent=2) + "\n")
    log(f"oracle environment ready at {env.folder}")
    return env
