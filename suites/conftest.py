"""Settings of the suites, shipped with them (harness.suites), so an installed harness runs
them as the repository does. The fixtures and options live in the plugin (harness/plugin.py)."""

import os

import pytest
from hypothesis import HealthCheck, settings

# ci: few, deterministic examples so the default run stays well inside its time budget.
settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                 HealthCheck.too_slow])
# dev: more examples, random, for hunting edge cases locally.
settings.register_profile("dev", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                 HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _offline(llava_offline):
    """Every test here runs offline: nothing may be downloaded. The plugin's fixture, so each
    test leaves the process as it found it and a foreign repository's tests are unaffected."""


@pytest.fixture
def bench_json(tmp_path, monkeypatch, capsys):
    """`llava-harness bench ARGS --json`, in process, with the cache in `tmp_path`: its one
    record's case, its metric values by name, and what it printed on stderr."""
    import json

    from harness.cli.app import main

    def run(*argv: str) -> tuple[str, dict, str]:
        monkeypatch.setenv("LLAVA_HARNESS_CACHE", str(tmp_path))
        assert main(["bench", *argv, "--json"]) == 0
        out = capsys.readouterr()
        (record,) = json.loads(out.out)["records"]
        return record["case"], {n: m["value"] for n, m in record["metrics"].items()}, out.err

    return run
