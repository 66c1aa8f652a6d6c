"""Green on the day a user installs it.

- A declared range is a tested range: the oldest versions pyproject.toml allows are pinned in
  `fixtures/constraints/oldest.txt` (CI runs every suite against them), and the versions the
  suites last passed with are in `fixtures/constraints/tested.txt`, so a verdict can be
  reproduced (`pip install llava-harness -c tested.txt`).
- Deprecations are found a release early: one the harness causes fails the run.
"""

from __future__ import annotations

import re
import tomllib
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from harness.console import quiet_third_party
from harness.data import fixtures_dir

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
CONSTRAINTS = fixtures_dir() / "constraints"


def pins(name: str) -> dict[str, Version]:
    """`package==version` lines of a constraints file, by normalized package name."""
    out = {}
    for line in (CONSTRAINTS / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{name}: {line}: not an exact pin"
            out[canonical(req.name)] = Version(spec.version)
    return out


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(build: bool = True) -> dict[str, Requirement]:
    """pyproject's dependencies (and what building the wheel needs, with `build`)."""
    if not PYPROJECT.is_file():
        pytest.skip("an installed harness: pyproject.toml stays in the checkout")
    project = tomllib.loads(PYPROJECT.read_text())
    deps = project["project"]["dependencies"]
    if build:
        deps = deps + project["build-system"]["requires"]
    return {canonical(r.name): r for r in map(Requirement, deps)}


def floor(req: Requirement) -> Version:
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
    assert len(lows) == 1, f"{req}: a dependency needs exactly one lower bound to test"
    return lows[0]


def test_every_dependency_has_a_floor_and_the_oldest_pins_are_the_floors():
    """The oldest set CI tests is exactly the floors of the declared ranges, no more and no
    less: raising a floor without testing it (or the reverse) fails here."""
    declared = requirements()
    oldest = pins("oldest.txt")
    assert set(oldest) == set(declared)
    assert {name: floor(req) for name, req in declared.items()} == oldest


def test_the_tested_versions_lie_in_the_declared_ranges():
    declared = requirements(build=False)
    tested = pins("tested.txt")
    assert set(declared) <= set(tested), f"not pinned: {set(declared) - set(tested)}"
    outside = {name: str(tested[name]) for name, req in declared.items()
               if not req.specifier.contains(tested[name], prereleases=True)}
    assert not outside, f"tested versions outside pyproject's ranges: {outside}"


HARNESS_MODULE = "harness.model.llava"
LIBRARY_MODULE = "transformers.configuration_utils"


def _warn(category, module: str) -> None:
    warnings.warn_explicit("x is deprecated", category, f"{module.replace('.', '/')}.py", 1,
                           module=module)


def _raised(category, module: str) -> bool:
    """Whether the filters in force make a deprecation attributed to `module` an error."""
    with warnings.catch_warnings(record=True):  # records what is not an error, filters kept
        try:
            _warn(category, module)
        except category:
            return True
    return False


@pytest.mark.parametrize("category", [FutureWarning, DeprecationWarning,
                                      PendingDeprecationWarning])
def test_a_deprecation_the_harness_causes_fails_the_run(category):
    """The suites' pytest.ini turns a deprecation attributed to the harness (its own, or a
    library's pointed at the harness's call) into an error, and leaves a library's notice
    about its own internals a warning."""
    assert _raised(category, HARNESS_MODULE)
    assert _raised(category, "suites.test_loader")
    assert _raised(category, "harness")
    assert not _raised(category, LIBRARY_MODULE)
    assert not _raised(category, "harnessing")  # a module that merely starts with the name


def test_a_command_silences_library_deprecations_but_not_the_harness_own():
    with quiet_third_party():
        assert _raised(FutureWarning, HARNESS_MODULE)
        with warnings.catch_warnings(record=True) as seen:
            _warn(FutureWarning, LIBRARY_MODULE)
    assert seen == []
