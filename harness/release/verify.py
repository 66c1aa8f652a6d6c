"""`verify-release`: every relation of a release manifest proved, one verdict each.

The kinds come first (the contract's: harness/llava/kinds.py): an artifact of the wrong kind
for its relation is that relation's fault, named, before a tensor is read. Then each relation
streams the tensors it compares (harness/release/relations.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import HarnessError
from .artifacts import Artifact, artifacts_of
from .manifest import Manifest, Relation, read_manifest
from .relations import Outcome, verify

# operation -> (the kinds the made artifact may be, the kinds of each input)
KINDS = {
    "merge": (("llava",), (("llava", "language_model"), ("lora",))),
    "convert": (("llava-hf", "llava"), (("llava", "llava-hf"),)),
    "strip": (("language_model",), (("llava", "llava-hf"),)),
    "quantize": (("llava",), (("llava",),)),
    "extract": (("projector",), (("llava",),)),
    "stage1": (("projector",), (("llava",),)),
}


@dataclass
class ReleaseReport:
    manifest: Manifest
    outcomes: list[Outcome]

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    def to_dict(self) -> dict:
        return {"manifest": str(self.manifest.path), "ok": self.ok,
                "relations": [{"relation": str(o.relation), "ok": o.ok, "faults": o.faults,
                               "notes": o.notes, "figures": o.figures}
                              for o in self.outcomes]}


def kind_faults(rel: Relation, artifacts: dict[str, Artifact]) -> list[str]:
    made, inputs = KINDS[rel.op]
    faults = []
    if artifacts[rel.target].kind not in made:
        faults.append(f"{rel.target} is a {artifacts[rel.target].kind} folder; {rel.op} makes "
                      f"{' or '.join(made)}")
    for name, kinds in zip(rel.sources, inputs):
        if artifacts[name].kind not in kinds:
            faults.append(f"{name} is a {artifacts[name].kind} folder; {rel.op} takes "
                          f"{' or '.join(kinds)} there")
    if rel.op == "convert" and artifacts[rel.target].kind == artifacts[rel.sources[0]].kind:
        faults.append(f"{rel.target} and {rel.sources[0]} are both {artifacts[rel.target].kind}:"
                      " a conversion changes the layout")
    return faults


def verify_relation(rel: Relation, artifacts: dict[str, Artifact]) -> Outcome:
    """One relation; a fault of the inputs themselves (unreadable, refused by the contract)
    is that relation's fault, so the others still run."""
    faults = kind_faults(rel, artifacts)
    if faults:
        return Outcome(rel, faults=faults)
    try:
        return verify(rel, artifacts)
    except HarnessError as exc:
        return Outcome(rel, faults=[f"cannot be verified: {exc}"])


def verify_release(path: Path) -> ReleaseReport:
    manifest = read_manifest(Path(path))
    artifacts = artifacts_of(manifest)
    return ReleaseReport(manifest, [verify_relation(r, artifacts) for r in manifest.relations])
