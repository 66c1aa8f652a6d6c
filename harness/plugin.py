"""The pytest plugin (registered through the `pytest11` entry point): options, markers, fixtures.

Installed with the package, so `pip install llava-harness` makes these fixtures available in
any repository. All options live in one group, `llava`, each parsed by a `type=` function that
rejects a bad value at parse time, naming it. The run's options (preset, checkpoint, base,
realsize, run id, baseline, fail) are declared once in harness/options.py, which
`llava-harness run` declares its own from too; the ones only pytest has are here.

Results: every test's outcome (with the skip or failure reason), the metrics it recorded
through `llava_record` and any pytest-benchmark statistics are collected during the session.
Nothing is written unless `--llava-report-dir DIR` is given: then `DIR/<run-id>/` gets
results.json, report.md and results.csv. `--llava-baseline FILE --llava-fail EXPR` gates the
run's metrics at session end (a failed check fails the session).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import pytest

from .data import SUITES, suites_dir
from .options import (PLUGIN_PREFIX, add_run_options, existing_file, folder_to_write,
                      unanchored_check)
from .oracle import source
from .oracle.cases import checkpoints
from .oracle.source import MODES as ORACLE_MODES
from .oracle.venv import default_env
from .report.collector import Collector, benchmark_metrics
from .report.environment import current
from .report.gate import evaluate
from .report.results import as_metric, metric_from_dict, metric_to_dict
from .synth.cache import cache_root, cached_build
from .synth.presets import TINY_PRESETS, build_spec

MARKERS = {
    "gpu": "needs a CUDA GPU; skipped with a reason on CPU",
    "realsize": "builds or reads real-size (7B/13B) checkpoints; run with --llava-realsize",
    "slow": "takes minutes on 2 CPU cores; runs only with --llava-slow",
}

# What `--llava-checkpoint DIR` runs when the arguments do not name the harness's suites: the
# checkpoint-folder suite and every rule of `llava-harness check`, one test each.
FOLDER_SUITES = ("test_checkpoint_folder.py", "test_folder_rules.py")
# What `--llava-release MANIFEST` runs: one test per relation of the release.
RELEASE_SUITE = "test_release_relations.py"

_COLLECTOR = pytest.StashKey[Collector]()
_ORACLES = pytest.StashKey[dict]()  # oracle name -> what it is, for the report
_METRICS = pytest.StashKey[dict]()  # on a test item: metric name -> Metric it recorded
_GATE_LINES = pytest.StashKey[list]()
_REPORT_PATH = pytest.StashKey[Path]()

_NO_GPU = "needs a CUDA GPU (torch.cuda.is_available() is False on this machine)"
_NO_SLOW = "slow: takes minutes on 2 cores; run with --llava-slow"
_NO_REALSIZE = ("real-size: builds a 13.5 GB+ checkpoint into the cache; run with --llava-realsize "
                "(cache folder: --llava-cache or LLAVA_HARNESS_CACHE)")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("llava", "llava-harness")
    add_run_options(group.addoption, PLUGIN_PREFIX)
    group.addoption("--llava-slow", action="store_true", default=False,
                    help="run the tests marked slow (the full LoRA matrix, child-process "
                         "benchmarks); without it they skip, and -m 'not slow' deselects them")
    group.addoption("--llava-cache", type=folder_to_write, default=None, metavar="DIR",
                    help="cache folder for real-size builds "
                         "(default: $LLAVA_HARNESS_CACHE or ~/.cache/llava-harness)")
    group.addoption("--llava-report-dir", type=folder_to_write, default=None, metavar="DIR",
                    help="write DIR/<run-id>/results.json, report.md and results.csv at the end "
                         "(default: write nothing)")
    group.addoption("--llava-release", type=existing_file, default=None, metavar="MANIFEST",
                    help="verify every relation of this release manifest, one test each")
    group.addoption("--llava-oracle", choices=ORACLE_MODES, default="auto",
                    help="original-LLaVA oracle: auto (default) = the live one where its "
                         "environment is set up ('llava-harness oracle setup') plus the stored "
                         "copies; live = as auto, but a missing live oracle is an error; "
                         "stored = the stored copies only")


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    relative = unanchored_check(config.getoption("--llava-fail"),
                                config.getoption("--llava-baseline"))
    if relative is not None:
        raise pytest.UsageError(f"--llava-fail {relative.text!r} is relative and needs "
                                "--llava-baseline FILE")
    config.stash[_ORACLES] = {}  # what this process's tests used; merged in the collector
    if not _is_worker(config):
        config.stash[_COLLECTOR] = Collector(SUITES)
        config.pluginmanager.register(_Gatherer(config.stash[_COLLECTOR]), "llava-gatherer")
    _add_folder_validation(config)
    _add_release_verification(config)


def _add_folder_validation(config: pytest.Config) -> None:
    """`pytest --llava-checkpoint DIR` anywhere (a model repository with tests of its own, or
    none) runs the harness's folder suites on DIR, unless the arguments name any
    of the harness's suites (then they chose which: `run --checkpoint DIR --suites x`)."""
    if config.getoption("--llava-checkpoint") is None:
        return

    suites = suites_dir().resolve()
    for arg in config.args:
        path = (config.invocation_params.dir / Path(arg.split("::", 1)[0])).resolve()
        if path == suites or suites in path.parents or path in suites.parents:
            return
    config.args.extend(str(suites / name) for name in FOLDER_SUITES)


def _add_release_verification(config: pytest.Config) -> None:
    """`pytest --llava-release MANIFEST` anywhere runs one test per relation of the release."""
    if config.getoption("--llava-release") is None:
        return

    suite = str(suites_dir() / RELEASE_SUITE)
    if suite not in config.args:
        config.args.append(suite)


@contextlib.contextmanager
def hub_offline():
    """Offline for as long as the block runs, then the process as it was: the environment
    variables, and huggingface_hub's flag (read once at its import, consulted on every
    request), whether or not huggingface_hub was imported inside the block."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {name: os.environ.get(name) for name in names}
    constants = sys.modules.get("huggingface_hub.constants")
    flag = getattr(constants, "HF_HUB_OFFLINE", None)
    os.environ.update(dict.fromkeys(names, "1"))
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None:  # as huggingface_hub computes it at import, if it did here
            constants.HF_HUB_OFFLINE = flag if flag is not None else (
                saved["HF_HUB_OFFLINE"] or saved["TRANSFORMERS_OFFLINE"] or "").upper() in (
                "1", "ON", "YES", "TRUE")


@pytest.fixture
def llava_offline():
    """Nothing reaches a hub during the test that asks for this (every test of the harness's
    own suites does); before and after it, the process is as it was."""
    with hub_offline():
        yield


def _cuda_available() -> bool:
    import torch  # heavy: torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    realsize = config.getoption("llava_realsize")
    slow = config.getoption("--llava-slow")
    need_cuda = any(item.get_closest_marker("gpu") for item in items)
    has_cuda = _cuda_available() if need_cuda else False
    for item in items:
        if item.get_closest_marker("realsize") and not realsize:
            item.add_marker(pytest.mark.skip(reason=_NO_REALSIZE))
        if item.get_closest_marker("slow") and not slow:
            item.add_marker(pytest.mark.skip(reason=_NO_SLOW))
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason=_NO_GPU))


class CheckpointFactory:
    """Builds synthetic checkpoints once per distinct spec and hands back their folders."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict = {}

    def __call__(self, preset: str = "tiny", *, model: dict | None = None,
                 checkpoint: dict | None = None) -> Path:
        from .synth.builder import build  # heavy: torch

        spec = build_spec(preset, model=model, checkpoint=checkpoint)
        if spec not in self._built:
            # 'llava' in the name: LLaVA's own loader routes a folder by its name.
            name = spec.model.name if "llava" in spec.model.name else f"llava-{spec.model.name}"
            folder = self.root / f"ckpt{len(self._built)}-{name}"
            with hub_offline():
                build(spec, folder)
            self._built[spec] = folder
        return self._built[spec]

    def spec_of(self, folder: Path):
        return next(spec for spec, path in self._built.items() if path == folder)


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """`factory(preset="tiny", model={...}, checkpoint={...})` -> folder, built once per spec."""
    return CheckpointFactory(tmp_path_factory.mktemp("llava-tiny"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoint_factory: CheckpointFactory) -> Path:
    """The default tiny LLaVA checkpoint: 2 `.bin` shards, tokenizer and CLIP tower."""
    return tiny_checkpoint_factory()


@pytest.fixture(scope="session")
def llava_cache(pytestconfig: pytest.Config) -> Path:
    return pytestconfig.getoption("--llava-cache") or cache_root()


@pytest.fixture(scope="session")
def realsize_checkpoint_factory(llava_cache: Path):
    """`factory(preset, model={...}, checkpoint={...})` -> a cached real-size folder."""
    def factory(preset: str = "llava-v1.5-7b", *, model: dict | None = None,
                checkpoint: dict | None = None) -> Path:
        with hub_offline():
            return cached_build(build_spec(preset, model=model, checkpoint=checkpoint), llava_cache)

    return factory


@pytest.fixture(scope="session")
def llava_oracle_folders(tiny_checkpoint_factory: CheckpointFactory) -> dict[str, Path]:
    """The tiny checkpoints the original-LLaVA oracle reads, by their oracle id."""
    return {entry["id"]: tiny_checkpoint_factory(entry["preset"], model=entry["model"],
                                                 checkpoint=entry["checkpoint"])
            for entry in checkpoints()}


@pytest.fixture(scope="session")
def llava_oracle(request: pytest.FixtureRequest, llava_oracle_folders):
    """The oracle named by the indirect parameter: "live" (computed on this machine by
    LLaVA's code; bit for bit) or "stored:<copy>" (a committed copy; bit for bit on a machine
    like the one that made it, else within the cross-machine ulp bounds)."""
    name = getattr(request, "param", "live")
    mode = request.config.getoption("--llava-oracle")
    if name == "live":
        if mode == "stored":
            pytest.skip("live oracle: --llava-oracle stored")
        if not default_env().is_ready():
            message = ("live oracle: its environment is not set up; run 'llava-harness oracle "
                       "setup' (LLaVA's wheel under transformers 4.37, ~30 s)")
            if mode == "live":
                pytest.fail(f"--llava-oracle live: {message}", pytrace=False)
            pytest.skip(message)
        oracle = source.live(llava_oracle_folders)
    else:
        oracle = source.stored_copy(name.removeprefix("stored:"))
    request.config.stash[_ORACLES][name] = oracle.describe()
    return oracle


# -- results: a fixture to record metrics, outcomes from the reports, written at the end -------

class MetricRecorder:
    """`llava_record(name, value, unit, direction=None)`: a metric of the current test's case.

    Units are strings ("s", "MiB", "tokens/s", "params", "ratio"); the direction (lower /
    higher / none is better) defaults from the unit (time and memory lower, "/s" higher).
    The metrics travel with the test's reports, so a run spread over pytest-xdist workers
    gathers them in the controller just as a serial run does.
    """

    def __init__(self, metrics: dict):
        self._metrics = metrics

    def __call__(self, name: str, value, unit: str, direction: str | None = None) -> None:
        spec = (value, unit) if direction is None else (value, unit, direction)
        self._metrics[name] = as_metric(name, spec)

    def update(self, metrics: dict) -> None:
        """`{"name": (value, unit) or (value, unit, direction)}` all at once."""
        for name, spec in metrics.items():
            self(name, *spec)

    def timed(self, name: str, work, rounds: int = 5, warmup: int = 1):
        """Time `work()` over `rounds` rounds after `warmup` unrecorded ones; records the
        sample under `name` (seconds) and returns the last round's result. A timing measured
        once says nothing about its noise, so timings go through here (or pytest-benchmark's
        `benchmark`)."""
        result = None
        for _ in range(warmup):
            result = work()
        times = []
        for _ in range(max(rounds, 1)):
            start = time.perf_counter()
            result = work()
            times.append(time.perf_counter() - start)
        self(name, times, "s")
        return result


@pytest.fixture
def llava_record(request: pytest.FixtureRequest) -> MetricRecorder:
    return MetricRecorder(request.node.stash.setdefault(_METRICS, {}))


@pytest.fixture(scope="session")
def llava_checkpoint_spec(pytestconfig: pytest.Config):
    """The BuildSpec of the synthetic checkpoint under test; None for a user's folder."""
    if pytestconfig.getoption("--llava-checkpoint") is not None:
        return None
    return build_spec(pytestconfig.getoption("--llava-preset"))


@pytest.fixture(scope="session")
def llava_checkpoint(pytestconfig: pytest.Config, llava_checkpoint_spec,
                     tiny_checkpoint_factory: CheckpointFactory) -> Path:
    """The folder under validation: `--llava-checkpoint DIR`, else a synthetic one of
    `--llava-preset` (tiny: built per session; real size: the cache, with --llava-realsize)."""
    user = pytestconfig.getoption("--llava-checkpoint")
    if user is not None:
        return user
    preset = pytestconfig.getoption("--llava-preset")
    if preset in TINY_PRESETS:
        return tiny_checkpoint_factory(preset)
    if not pytestconfig.getoption("llava_realsize"):
        pytest.skip(f"--llava-preset {preset}: {_NO_REALSIZE}")

    root = pytestconfig.getoption("--llava-cache") or cache_root()
    with hub_offline():
        return cached_build(llava_checkpoint_spec, root)


def _reason(report: pytest.TestReport) -> str | None:
    if report.skipped:
        if hasattr(report, "wasxfail"):
            return f"xfail: {report.wasxfail}".rstrip(": ")
        longrepr = report.longrepr
        text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        return text.removeprefix("Skipped: ")
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr or "")
    first = next((line for line in text.splitlines() if line.strip()), "")
    return f"{report.when}: {first}" if report.when != "call" else first


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """In the process that ran the test (a worker, under xdist): what the harness gathers goes
    onto the report as plain data, which xdist carries to the controller with the report."""
    report = yield
    report.llava_nodeid = _record_nodeid(item)
    if report.when == "setup":
        report.llava_doc = getattr(getattr(item, "module", None), "__doc__", None)
    if report.when == "call":
        bench = getattr(item, "funcargs", {}).get("benchmark")
        stats = getattr(getattr(bench, "stats", None), "stats", None)
        if stats:  # pytest-benchmark ran: fold its statistics into this case
            item.stash.setdefault(_METRICS, {}).update(benchmark_metrics(stats))
    metrics = item.stash.get(_METRICS, {})
    if metrics:  # as results.json writes them: plain data that xdist carries
        report.llava_metrics = {name: metric_to_dict(m) for name, m in metrics.items()}
    oracles = item.config.stash.get(_ORACLES, {})
    if oracles:
        report.llava_oracles = dict(oracles)
    return report


def _record_nodeid(item: pytest.Item) -> str:
    """The node id, or for a file outside the rootdir (the folder suite that
    `--llava-checkpoint` adds in someone else's repository, which pytest ids as "::test_x")
    the same with the file's name, so its records name their suite."""
    try:
        item.path.relative_to(item.config.rootpath)
        return item.nodeid
    except ValueError:
        return f"{item.path.name}::{item.nodeid.partition('::')[2]}"


class _Gatherer:
    """Turns reports into result records: in a serial run, and in the controller of an xdist
    run (its workers only test; the controller gathers, writes and gates once)."""

    def __init__(self, collector):
        self.collector = collector

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        collector = self.collector
        nodeid = getattr(report, "llava_nodeid", report.nodeid)
        if getattr(report, "llava_doc", None):
            collector.describe(nodeid, report.llava_doc)
        for name, entry in getattr(report, "llava_metrics", {}).items():
            collector.add_metric(nodeid, name, metric_from_dict(entry, f"{nodeid} {name}"))
        collector.oracles.update(getattr(report, "llava_oracles", {}))
        if report.passed and not hasattr(report, "wasxfail"):
            collector.outcome(nodeid, "passed")
        elif report.skipped:
            collector.outcome(nodeid, "skipped", _reason(report))
        elif report.failed:
            outcome = "failed" if report.when == "call" else "error"
            collector.outcome(nodeid, outcome, _reason(report))
        else:  # an unexpected pass of an xfail
            collector.outcome(nodeid, "passed")


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")  # pytest-xdist sets it on its workers only


def _relative(arg: str, root: Path) -> str:
    return arg.removeprefix(f"{root}/")


def _settings(config: pytest.Config) -> dict[str, str]:
    """What a reader of the report needs to know about how this run was made."""
    user = config.getoption("--llava-checkpoint")
    out = {"checkpoint": str(Path(user).absolute()) if user is not None
           else f"synthetic ({config.getoption('--llava-preset')} preset)",
           "realsize": str(config.getoption("llava_realsize")).lower(),
           "pytest_args": " ".join(_relative(arg, config.rootpath)
                                   for arg in config.invocation_params.args)}
    workers = getattr(config.option, "numprocesses", None)  # pytest-xdist's -n
    if workers:
        out["workers"] = f"{workers} (pytest-xdist; pytest-benchmark timings are off)"
    baseline = config.getoption("--llava-baseline")
    if baseline is not None:
        out["baseline_run"] = baseline.run_id
    for name, what in sorted(config.stash[_COLLECTOR].oracles.items()):
        out[f"oracle {name}"] = what
    return out


def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    config = session.config
    if _is_worker(config):
        return  # the controller writes and gates, once, from every worker's reports
    report_dir = config.getoption("--llava-report-dir")
    checks = config.getoption("--llava-fail")
    if report_dir is None and not checks:
        return  # the default run writes nothing and measures nothing

    results = config.stash[_COLLECTOR].results(config.getoption("--llava-run-id"), current(),
                                               _settings(config))
    if report_dir is not None:
        from .report.single import write_report  # heavy: tabulate

        paths = write_report(results, Path(report_dir) / results.run_id)
        config.stash[_REPORT_PATH] = paths["markdown"]
    if checks:
        gate = evaluate(checks, results, config.getoption("--llava-baseline"), outcomes=False)
        warnings, lines = gate.printed(len(checks))
        config.stash[_GATE_LINES] = warnings + lines
        if not gate.ok and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    lines = config.stash.get(_GATE_LINES, None)
    if lines is not None:
        terminalreporter.section("llava-harness gate")
        for line in lines:
            terminalreporter.write_line(line)
    collector = config.stash.get(_COLLECTOR, None)
    for name, what in sorted(collector.oracles.items() if collector else ()):
        terminalreporter.write_line(f"llava-harness oracle {name}: {what}")
    path = config.stash.get(_REPORT_PATH, None)
    if path is not None:
        terminalreporter.write_line(f"llava-harness report: {path}")
