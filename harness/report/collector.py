"""What the pytest plugin gathers during a session, kept free of pytest so it is testable alone.

Per test node: its suite (from the file), case (the rest of the node id), the worst outcome over
setup/call/teardown with the reason, and the metrics the test recorded through the
`llava_record` fixture or that pytest-benchmark measured. They become Records (and are checked
as results.json's names are) only when a report is asked for: the plugin runs in every pytest
session of an environment that has the harness, and a foreign test id of 1,200 characters must
not break a session that writes no report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .environment import Environment
from .results import Metric, Record, Results, new_run_id, now

# Later phases can only make a case worse: a teardown error after a pass is an error.
_SEVERITY = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}


@dataclass
class CaseState:
    suite: str
    case: str
    outcome: str = "passed"
    reason: str | None = None
    metrics: dict[str, Metric] = field(default_factory=dict)
    timestamp: str = ""
    seen: bool = False  # an outcome was reported (a recorder alone does not make a case)


def suite_name(file_name: str, suites: dict[str, str]) -> str:
    """The suite a test file belongs to: its name in `suites` (name -> file), else the file
    stem without the `test_` prefix."""
    for name, path in suites.items():
        if path == file_name:
            return name
    stem = file_name.rsplit("/", 1)[-1].removesuffix(".py")
    return stem.removeprefix("test_")


def split_nodeid(nodeid: str) -> tuple[str, str]:
    """`suites/test_x.py::TestA::test_b[p]` -> (`suites/test_x.py`, `TestA::test_b[p]`)."""
    path, _, rest = nodeid.partition("::")
    return path, rest or path


def benchmark_metrics(stats) -> dict[str, Metric]:
    """pytest-benchmark's Stats as one metric: every round's time as a sample, so n, median,
    IQR, MAD, min and max are all there, losslessly (its ops/s is 1/mean of the same rounds,
    a second figure with no noise of its own, and is left out)."""
    return {"bench_s": Metric.of([float(v) for v in stats.data], "s", "lower")}


class Collector:
    def __init__(self, suites: dict[str, str]):
        self.suites = suites
        self.cases: dict[str, CaseState] = {}
        self._suite_files: dict[str, str] = {}
        self.descriptions: dict[str, str] = {}
        self.oracles: dict[str, str] = {}  # oracle name -> what it is, for the report

    def describe(self, nodeid: str, doc: str | None) -> None:
        """The suite's description: the first paragraph of its module docstring, one line."""
        suite = self.case(nodeid).suite
        if doc and suite not in self.descriptions:
            self.descriptions[suite] = " ".join(doc.strip().split("\n\n")[0].split())

    def case(self, nodeid: str) -> CaseState:
        if nodeid not in self.cases:
            path, case = split_nodeid(nodeid)
            suite = suite_name(path.rsplit("/", 1)[-1], self.suites)
            # Two files with one suite name (same file name in two folders): use the path.
            if self._suite_files.setdefault(suite, path) != path:
                suite = path.removesuffix(".py")
            self.cases[nodeid] = CaseState(suite, case, timestamp=now())
        return self.cases[nodeid]

    def add_metric(self, nodeid: str, name: str, metric: Metric) -> None:
        self.case(nodeid).metrics[name] = metric

    def outcome(self, nodeid: str, outcome: str, reason: str | None = None) -> None:
        state = self.case(nodeid)
        state.seen = True
        if _SEVERITY[outcome] > _SEVERITY[state.outcome]:
            state.outcome, state.reason = outcome, reason

    def results(self, run_id: str | None, environment: Environment,
                settings: dict[str, str] | None = None) -> Results:
        records = [Record(suite=s.suite, case=s.case, outcome=s.outcome, reason=s.reason,
                          metrics=s.metrics, timestamp=s.timestamp, environment=environment)
                   for s in self.cases.values() if s.seen]
        suites = {r.suite for r in records}
        return Results(run_id=run_id or new_run_id(), environment=environment,
                       records=tuple(records), created=now(),
                       suite_descriptions={k: v for k, v in self.descriptions.items()
                                           if k in suites}, settings=settings or {})
