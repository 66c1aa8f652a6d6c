"""Which oracle a run compares against, and how strictly.

A live oracle was computed on this machine, so the harness must match it bit for bit. Stored
copies (committed under `fixtures/reference/original-llava/<machine>/`, the way transformers
keys expected values by device) each record the numeric fingerprint of the machine that
computed them: the copy whose fingerprint equals this machine's is matched bit for bit; with
none, the closest (same CPU vendor, else the first) is matched within
`[oracle.cross_machine.<dtype>]` of the tolerance file, a bound in units of the dtype's ulp at
the tensor's largest magnitude.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..data import fixtures_dir
from ..report.environment import numeric_fingerprint
from ..tolerances import tolerance, ulp_at_scale, ulps_apart  # noqa: F401 (re-exported)
from .live import cached
from .venv import OracleError

STORED_ROOT = fixtures_dir() / "reference" / "original-llava"
MODES = ("auto", "live", "stored")


def describe_machine(manifest: dict) -> str:
    fp = manifest.get("computed_on")
    if not fp:
        return "an unrecorded machine"
    return (f"{fp.get('cpu_model')} ({fp.get('cpu_vendor')}, {fp.get('cpu_family')}, "
            f"{fp.get('cpu_isa')}; torch {fp.get('torch')} {fp.get('torch_cpu_capability')}, "
            f"{fp.get('torch_blas')}, {fp.get('torch_threads')} threads)")


@dataclass(frozen=True)
class Oracle:
    kind: str  # "live" | "stored"
    folder: Path
    manifest: dict
    exact: bool  # bit-identity required (computed here, or on a machine just like this one)

    @property
    def cases(self) -> list[dict]:
        return self.manifest["cases"]

    def case(self, case_id: str) -> dict | None:
        return next((c for c in self.cases if c["id"] == case_id), None)

    def describe(self) -> str:
        where = describe_machine(self.manifest)
        llava = self.manifest.get("llava", {})
        code = llava.get("package") and f"llava-torch {llava['package']}" or \
            f"LLaVA {llava.get('commit', '?')[:7]}"
        rule = "bit for bit" if self.exact else "within [oracle.cross_machine] ulp bounds"
        what = ("computed here" if self.kind == "live"
                else f"stored copy {self.folder.name}, computed on {where}")
        return f"{self.kind} oracle ({code}, {what}): compared {rule}"

    def tensors(self, case: dict) -> dict:
        from safetensors.torch import load_file  # heavy: safetensors.torch

        return load_file(str(self.folder / case["file"]))

    def images(self) -> dict:
        from safetensors.torch import load_file  # heavy: safetensors.torch

        return load_file(str(self.folder / self.manifest["images"]["file"]))

    def mismatch(self, name: str, ours, expected, dtype) -> str | None:
        """None when `ours` matches `expected` under this oracle's rule, else one line."""
        return mismatch(name, ours, expected, dtype, self.exact)


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OracleError(f"{path}: cannot read the oracle manifest ({exc})") from None


def stored_names() -> list[str]:
    """The stored copies' folder names, one per machine they were computed on."""
    return sorted(p.name for p in STORED_ROOT.iterdir() if (p / "manifest.json").is_file())


def stored_copy(name: str) -> Oracle:
    """One stored copy, exact when it was computed on a machine like this one."""
    if name not in stored_names():
        raise OracleError(f"{STORED_ROOT / name}: no such stored oracle copy")
    manifest = read_manifest(STORED_ROOT / name)
    exact = manifest.get("computed_on") == numeric_fingerprint()
    return Oracle("stored", STORED_ROOT / name, manifest, exact)


def stored_copies() -> list[Oracle]:
    copies = [stored_copy(name) for name in stored_names()]
    if not copies:
        raise OracleError(f"{STORED_ROOT}: no stored oracle copy (a folder with manifest.json)")
    return copies


def stored() -> Oracle:
    """The stored copy made on a machine like this one; else one of the same CPU vendor
    (compared within the cross-machine bound), else the first."""
    copies = stored_copies()
    vendor = numeric_fingerprint().get("cpu_vendor")
    return (next((c for c in copies if c.exact), None)
            or next((c for c in copies
                     if (c.manifest.get("computed_on") or {}).get("cpu_vendor") == vendor), None)
            or copies[0])


def live(folders: dict[str, Path] | None = None) -> Oracle:
    folder = cached(folders)
    return Oracle("live", folder, read_manifest(folder), exact=True)


# --- the comparison -----------------------------------------------------------------------

def mismatch(name: str, ours, expected, dtype, exact: bool) -> str | None:
    import torch  # heavy: torch

    ours, expected = ours.float(), expected.float()
    if ours.shape != expected.shape:
        return f"{name}: shape {tuple(ours.shape)} != oracle {tuple(expected.shape)}"
    if torch.equal(ours, expected):
        return None
    diff = (ours - expected).abs().max().item()
    ulps = ulps_apart(ours, expected, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    if exact:
        return f"{name}: not bit-identical: max |diff| {diff:.3g} ({ulps:.3g} {dtype_name} ulps)"
    bound = tolerance(f"oracle.cross_machine.{dtype_name}")
    if ulps <= bound.ulps:
        return None
    return (f"{name}: max |diff| {diff:.3g} = {ulps:.3g} {dtype_name} ulps at scale, over the "
            f"cross-machine bound of {bound.ulps:g}")
