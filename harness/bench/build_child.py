"""Build benchmark, the child's side: the builder on one spec, in the fresh process that
harness/bench/build.py measures through the launcher."""

from __future__ import annotations

from ..synth.specs import spec_from_dict


def build_child(spec: dict, target: str) -> None:
    """The builder on `spec` (a BuildSpec as a dict), replacing `target`."""
    # The builder imports torch: inside the function, so the parent (which imports this module
    # to name its child) stays light.
    from ..synth.builder import build  # heavy: torch

    build(spec_from_dict(spec), target, force=True)
