"""The environment fingerprint every result carries: hardware, driver, libraries, harness commit.

Two runs are only comparable when their environments say so, and a gate warns when they
differ; so the fingerprint names everything that moves a figure: GPU (name, memory, driver,
CUDA), CPU model and count, memory, OS, Python, the libraries under test, and the harness's
own git commit with a dirty flag. It also names what explains numeric differences between
machines: CPU vendor, family and ISA level, and where torch is loaded its dispatch level, BLAS
and oneDNN builds, threads, and on CUDA the compute capability, cuDNN and TF32. Library
versions come from package metadata, GPU facts from NVML (nvidia-ml-py, report/nvml.py) and
the CUDA version from torch's version file, so a fingerprint costs milliseconds and never
imports torch (2.4 s) on its own account.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import harness

from ..checkpoint.problems import brief
from ..errors import HarnessError
from .nvml import gpus as nvml_gpus

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "safetensors", "accelerate",
             "llava-harness")
# The fields a gate warns about when they differ between a baseline and a run: the ones that
# move figures. Host name and commit are informative, not a reason to distrust a comparison.
COMPARED_FIELDS = ("gpu_name", "gpu_count", "gpu_memory_mib", "gpu_driver", "cuda_version",
                   "cpu_vendor", "cpu_model", "cpu_family", "cpu_isa", "cpu_count", "memory_mib",
                   "os", "python", "libraries", "torch_cpu_capability", "torch_blas",
                   "torch_onednn", "torch_threads", "cuda_capability", "cudnn_version", "tf32")
# The fields that decide floating-point results on one machine (the kernels torch picks and
# how it splits reductions): two computations agree bit for bit only where all of them match.
NUMERIC_FIELDS = ("cpu_vendor", "cpu_model", "cpu_family", "cpu_isa", "torch_cpu_capability",
                  "torch_blas", "torch_onednn", "torch_threads")
# ISA extensions that change which kernels MKL, oneDNN and ATen pick, lowest first.
ISA_LEVELS = (("amx", ("amx_tile", "amx_bf16")), ("avx512_bf16", ("avx512_bf16",)),
              ("avx512", ("avx512f",)), ("avx2", ("avx2",)))


class EnvironmentSchemaError(HarnessError):
    """An environment entry in a results file is malformed."""


@dataclass(frozen=True)
class Environment:
    hostname: str | None = None
    os: str | None = None
    python: str | None = None
    cpu_vendor: str | None = None
    cpu_model: str | None = None
    cpu_family: str | None = None  # "family 26 model 2": one model name spans generations
    cpu_isa: str | None = None  # the highest of ISA_LEVELS the CPU reports, else "baseline"
    cpu_count: int | None = None
    memory_mib: int | None = None
    gpu_name: str | None = None
    gpu_count: int = 0
    gpu_memory_mib: int | None = None
    gpu_driver: str | None = None
    cuda_version: str | None = None
    # What torch computes with (filled where torch is imported): ATen's dispatch level, the
    # BLAS and oneDNN builds, intra-op threads; on CUDA the compute capability, cuDNN and TF32.
    torch_cpu_capability: str | None = None
    torch_blas: str | None = None
    torch_onednn: str | None = None
    torch_threads: int | None = None
    cuda_capability: str | None = None
    cudnn_version: str | None = None
    tf32: bool | None = None
    # {"torch": "2.13.0", ...}; None for a library that is not installed.
    libraries: dict[str, str | None] = dataclasses.field(default_factory=dict)
    git_commit: str | None = None
    git_dirty: bool | None = None

    def __hash__(self) -> int:  # the libraries dict would make the generated hash fail
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["libraries"] = dict(sorted(self.libraries.items()))
        return out

    @classmethod
    def from_dict(cls, data, source: str = "environment") -> Environment:
        if not isinstance(data, dict):
            raise EnvironmentSchemaError(f"{source}: environment is a {type(data).__name__}, "
                                    "not an object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise EnvironmentSchemaError(f"{source}: environment has unknown field "
                                         f"{brief(unknown[0])}")
        libs = data.get("libraries", {})
        if not isinstance(libs, dict) or not all(isinstance(k, str) and
                                                 (v is None or isinstance(v, str))
                                                 for k, v in libs.items()):
            raise EnvironmentSchemaError(f"{source}: environment.libraries must map names to "
                                    "version strings or null")
        return cls(**{**data, "libraries": dict(libs)})

    def label(self) -> str:
        """A short name for the hardware: the GPU, else the CPU with its ISA level and cores
        (two "AMD EPYC" machines can differ in what moves a figure)."""
        if self.gpu_name:
            return self.gpu_name if self.gpu_count <= 1 else f"{self.gpu_count}x {self.gpu_name}"
        cpu = self.cpu_model or "unknown CPU"
        details = [d for d in (self.cpu_isa, f"{self.cpu_count} cores" if self.cpu_count
                               else None) if d]
        return f"{cpu} ({', '.join(details)})" if details else cpu

    def differences(self, other: Environment) -> list[str]:
        """One line per compared field that differs: 'gpu_name: A != B'."""
        lines = []
        for name in COMPARED_FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if name == "libraries":
                for lib in sorted(set(mine) | set(theirs)):
                    if mine.get(lib) != theirs.get(lib):
                        lines.append(f"{lib}: {mine.get(lib)} != {theirs.get(lib)}")
            elif mine != theirs:
                lines.append(f"{name}: {mine} != {theirs}")
        return lines


def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                name, _, value = line.partition(":")
                fields[name.strip()] = value.strip()
    except OSError:
        pass
    return fields


def isa_level(flags: set[str]) -> str:
    return next((level for level, needs in ISA_LEVELS if any(f in flags for f in needs)),
                "baseline")


def _cpu_facts() -> dict:
    info = _cpuinfo()
    family = (f"family {info['cpu family']} model {info.get('model', '?')}"
              if "cpu family" in info else None)
    return {"cpu_vendor": info.get("vendor_id") or None,
            "cpu_model": info.get("model name") or platform.processor() or None,
            "cpu_family": family,
            "cpu_isa": isa_level(set(info.get("flags", "").split())) if info else None}


def torch_facts() -> dict:
    """What torch computes with; imports torch (call it where torch is loaded anyway)."""
    import torch  # heavy: torch

    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\w.]+)", config)
    onednn = re.search(r"MKL-DNN v([\w.]+)", config)
    facts = {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "torch_blas": (f"{blas.group(1)} {mkl.group(1)}" if blas and mkl and
                            blas.group(1) == "mkl" else blas.group(1) if blas else None),
             "torch_onednn": onednn.group(1) if onednn else None,
             "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        facts.update(cuda_capability=f"{major}.{minor}",
                     cudnn_version=None if cudnn is None else str(cudnn),
                     tf32=bool(torch.backends.cuda.matmul.allow_tf32))
    return facts


def numeric_fingerprint() -> dict:
    """The NUMERIC_FIELDS of this machine and process, with torch's version: equal
    fingerprints mean two computations of the same thing agree bit for bit."""
    facts = {**_cpu_facts(), **torch_facts()}  # no git, no NVML: only what moves the bits
    return {"torch": _version("torch"), **{name: facts.get(name) for name in NUMERIC_FIELDS}}


def _memory_mib() -> int | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return pages * size // 2**20


def _cpu_count() -> int | None:
    # The cores this process may use (a container's limit), not the host's.
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _torch_cuda_version() -> str | None:
    """torch's CUDA version without importing torch (2.4 s) when nothing has yet: it is
    written into torch/version.py at build time."""
    if "torch" in sys.modules:
        return sys.modules["torch"].version.cuda
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    version_py = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        match = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]",
                          version_py.read_text(), re.MULTILINE)
    except OSError:
        return None
    return match.group(1) if match else None


def _gpu_facts() -> dict:
    """GPU name, count, memory and driver from NVML; from torch when NVML is absent and torch
    is already imported (never imported just for this)."""
    facts: dict = {"cuda_version": _torch_cuda_version()}

    gpus, driver = nvml_gpus()
    if gpus:
        facts.update(gpu_name=gpus[0][0], gpu_count=len(gpus), gpu_memory_mib=gpus[0][1],
                     gpu_driver=driver)
    elif "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        torch = sys.modules["torch"]
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu_name=props.name, gpu_count=torch.cuda.device_count(),
                     gpu_memory_mib=props.total_memory // 2**20)
    return facts


def harness_repo() -> Path | None:
    """The git work tree the harness package lives in (an editable install), else None."""
    root = Path(harness.__file__).resolve().parent.parent  # wherever this module moves
    return root if (root / ".git").exists() else None


def git_state(repo: Path | None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of a git work tree; (None, None) when it is not one or git is absent."""
    if repo is None:
        return None, None
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True, timeout=30).stdout.strip()
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                 "--untracked-files=normal"], check=True,
                                capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, bool(status.strip())


def collect(probe_gpu: bool = True, probe_torch: bool | None = None) -> Environment:
    """The fingerprint of this machine and process, measured now. torch's facts are read
    when torch is already imported (or `probe_torch=True`): never 2.4 s for a fingerprint."""
    commit, dirty = git_state(harness_repo())
    env = Environment(
        hostname=socket.gethostname() or None, os=platform.platform(),
        python=platform.python_version(), **_cpu_facts(), cpu_count=_cpu_count(),
        memory_mib=_memory_mib(), libraries={name: _version(name) for name in LIBRARIES},
        git_commit=commit, git_dirty=dirty)
    if probe_gpu:
        env = dataclasses.replace(env, **_gpu_facts())
    if probe_torch or (probe_torch is None and "torch" in sys.modules):
        env = dataclasses.replace(env, **torch_facts())
    return env


@lru_cache(maxsize=1)
def current() -> Environment:
    """This process's fingerprint, measured once (records made in one run share it)."""
    return collect()
