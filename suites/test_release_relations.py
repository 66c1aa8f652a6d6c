"""Every relation of a release manifest as its own test (`pytest --llava-release MANIFEST`), so
pytest's summary, the report, the gate and JUnit see each: a relation that does not hold fails
with its faults, and its figures (tensors compared, bit-identical, the largest difference in
ulps, wall time, bytes) are recorded for `compare` and `gate`.

Without --llava-release there is nothing to verify: the one test skips, saying so. The
relations themselves, and a release made by other tools with planted faults, are proved in
suites/test_verify_release.py.
"""

from __future__ import annotations

import pytest

from harness.release.artifacts import artifacts_of
from harness.release.manifest import read_manifest
from harness.release.verify import verify_relation

_UNITS = {"wall_s": "s", "bytes": "B", "max_ulps": "ulps", "max_relative_error": "ratio",
          "max_relative_change": "ratio"}


def pytest_generate_tests(metafunc):
    if "relation" not in metafunc.fixturenames:
        return
    path = metafunc.config.getoption("--llava-release")
    relations = list(read_manifest(path).relations) if path else [None]
    metafunc.parametrize("relation", relations,
                         ids=[str(r).replace(" ", "") if r else "none" for r in relations])


@pytest.fixture(scope="module")
def artifacts(pytestconfig):
    return artifacts_of(read_manifest(pytestconfig.getoption("--llava-release")))


def test_relation(relation, request, llava_record):
    if relation is None:
        pytest.skip("no release manifest: run with --llava-release MANIFEST")
    outcome = verify_relation(relation, request.getfixturevalue("artifacts"))
    llava_record.update({f"release_{name}": (value, _UNITS.get(name, "count"))
                         for name, value in outcome.figures.items()})
    assert outcome.ok, f"{relation}:\n" + "\n".join(outcome.faults)
