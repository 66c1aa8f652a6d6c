"""Every rule of `llava-harness check` as its own test, on the folder under validation
(`--llava-checkpoint DIR`, else the tiny synthetic default), so pytest's summary, the report,
the gate and JUnit see each one: an error fails the test, a warning passes it as a pytest
warning (and is counted in the record), a rule that cannot look at this folder skips, saying why.

`--llava-base DIR` gives an adapter folder's base. The rules themselves, and a crafted folder
for each that trips it, are in harness/llava/check/ and suites/test_contract.py.
"""

from __future__ import annotations

import warnings

import pytest

from harness.checkpoint.problems import CheckpointError
from harness.llava.check import RULES, run_rule
from harness.llava.check.context import Context
from harness.llava.errors import ContractError


class FolderWarning(UserWarning):
    """A warning-class finding of `llava-harness check` on the folder under validation."""


@pytest.fixture(scope="module")
def context(llava_checkpoint, pytestconfig) -> Context:
    base = pytestconfig.getoption("--llava-base")
    ctx = Context(llava_checkpoint, Context(base) if base else None)
    try:
        ctx.detected
    except (CheckpointError, ContractError) as exc:
        pytest.fail(f"not a model folder: {exc}", pytrace=False)
    return ctx


@pytest.mark.parametrize("code", list(RULES))
def test_rule(code, context, llava_record):
    result = run_rule(RULES[code], context)
    if result.skipped:
        pytest.skip(f"{code}: {result.skipped}")
    by = {s: [f for f in result.findings if f.severity == s] for s in ("error", "warning",
                                                                        "info")}
    llava_record.update({f"findings_{s}": (len(found), "findings") for s, found in by.items()})
    for finding in by["warning"] + by["info"]:
        warnings.warn(FolderWarning(finding.line()), stacklevel=1)
    assert not by["error"], "\n".join(f.line() for f in by["error"])
