"""`llava-harness run`: the main job. Runs suites through pytest, writes the report, says where.

The suites ship with the package as `harness.suites` (the repository's `suites/` folder, which
an editable install maps onto the same name), so `run` works from any folder after a plain
`pip install`; `--suites-dir` points elsewhere. Each suite name maps to one file; a name
whose file does not exist (yet) is skipped with a message. pytest runs in a child process
(its own imports, its own exit code), with the plugin writing `<output>/<run-id>/`; its
output is streamed and kept in `pytest.log` there. `--workers N` spreads the tests over N
pytest-xdist processes; the plugin gathers their results in the controller.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.reader import open_folder
from ..console import print_json
from ..data import SUITES, suites_dir
from ..errors import HarnessError
from ..options import plugin_flag, unanchored_check
from ..report.environment import current
from ..report.gate import baseline_for, evaluate, machine_class
from ..report.results import OUTCOMES, ResultsError, load_results, new_run_id

# The default: what a user means by "check the tiny default end to end" and what CI can afford
# before the full `pytest suites` (which runs everything anyway): the builder (build, layout,
# LM strictly loaded and run, tokenizer, tower), the checkpoint-folder validation (index,
# projector type and counts, extraction, strip), the harness's LLaVA model held bit-identical to
# LLaVA's own code, the extraction and counts suites, and the figures: each operation timed
# over repeated rounds (what a baseline and a gate look at).
DEFAULT_SUITES = ("builder", "checkpoint", "rules", "original", "extraction", "counts",
                  "figures")
# With --checkpoint, the suites that look at the user's folder.
CHECKPOINT_SUITES = ("checkpoint", "rules")
# pytest's own "usage error" / "internal error" / "no tests" exit codes.
_PYTEST_USAGE, _PYTEST_INTERNAL, _PYTEST_NO_TESTS = 4, 3, 5


class RunError(HarnessError):
    pass


def parse_suite_names(text: str) -> tuple[str, ...]:
    """'extraction,counts' -> names; 'all' -> every known suite; an unknown name is an error
    naming it and the known ones."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise RunError(f"--suites {text!r}: no suite named")
    if names == ("all",):
        return tuple(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise RunError(f"--suites: unknown suite {unknown[0]!r}; known: "
                       f"{', '.join(SUITES)}, or all")
    return tuple(dict.fromkeys(names))


def suite_files(names: tuple[str, ...], suites_dir: Path) -> tuple[list[Path], list[str]]:
    """(existing files, one message per skipped name)."""
    files, skipped = [], []
    for name in names:
        path = suites_dir / SUITES[name]
        if path.is_file():
            files.append(path)
        else:
            skipped.append(f"suite {name}: {path} does not exist (yet); skipped")
    return files, skipped


@dataclass
class RunOptions:
    suites: tuple[str, ...] | None = None
    preset: str = "tiny"
    checkpoint: Path | None = None
    base: Path | None = None  # an adapter folder's base, with checkpoint
    report_dir: Path = Path("reports")
    suites_dir: Path | None = None
    realsize: bool = False
    select: str | None = None
    baseline: Path | None = None
    checks: list = field(default_factory=list)
    run_id: str | None = None
    pytest_args: tuple[str, ...] = ()  # after `--` on the command line, for pytest as they are
    workers: int | None = None  # pytest-xdist processes; None: serial
    as_json: bool = False  # print the verdict as one JSON object (the CLI's --json)


def pytest_command(files: list[Path], opts: RunOptions, run_id: str) -> list[str]:
    # -P: the working folder is not put on sys.path, so the harness the suites test is the
    # one this process runs, never a checkout that happens to be the current folder.
    cmd = [sys.executable, "-P", "-m", "pytest", *map(str, files), "-q", "-p",
           "no:cacheprovider", "--tb=line",
           plugin_flag("report-dir"), str(Path(opts.report_dir).absolute()),
           plugin_flag("run-id"), run_id, plugin_flag("preset"), opts.preset]
    if opts.checkpoint is not None:
        cmd += [plugin_flag("checkpoint"), str(Path(opts.checkpoint).absolute())]
        if opts.base is not None:
            cmd += [plugin_flag("base"), str(Path(opts.base).absolute())]
    if opts.realsize:
        cmd.append(plugin_flag("realsize"))
    if opts.select:
        cmd += ["-k", opts.select]
    if opts.workers:
        # loadfile: a module's tests share one worker, so its module-scoped fixtures (a
        # checkpoint built once, a model loaded once) are not rebuilt on every worker.
        cmd += ["-n", str(opts.workers), "--dist", "loadfile"]
    return cmd + list(opts.pytest_args)


def _stream(cmd: list[str], cwd: Path, log: Path) -> tuple[int, list[str]]:
    """Run, echoing output as it comes and keeping it in `log`; (exit code, last lines)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.setdefault("HYPOTHESIS_PROFILE", "ci")
    log.parent.mkdir(parents=True, exist_ok=True)
    tail: list[str] = []
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)  # stderr under --json (harness.console)
            out.write(line)
            tail = (tail + [line.rstrip("\n")])[-20:]
        return proc.wait(), tail


def _check_inputs(opts: RunOptions) -> Path:
    folder = Path(opts.suites_dir) if opts.suites_dir else suites_dir()
    if not folder.is_dir():
        raise RunError(f"{folder}: no suites folder here (pass --suites-dir DIR; every "
                       "install, editable or a non-editable install of the wheel, ships them as "
                       "harness.suites)")
    report_dir = Path(opts.report_dir)
    if report_dir.exists() and not report_dir.is_dir():
        raise RunError(f"-o {report_dir}: exists and is not a folder")
    if opts.workers:
        if importlib.util.find_spec("xdist") is None:
            raise RunError("--workers needs pytest-xdist (pip install pytest-xdist)")
    if opts.checkpoint is not None:
        open_folder(Path(opts.checkpoint))  # not a checkpoint at all: one line, exit 2
    relative = unanchored_check(opts.checks, opts.baseline)
    if relative is not None:
        raise RunError(f"--fail {relative.text!r} is relative and needs --baseline")
    return folder


def summarize(results) -> list[str]:
    from tabulate import tabulate  # heavy: tabulate

    from ..report.single import outcome_counts  # heavy: tabulate

    rows = []
    for suite in results.suites:
        counts = outcome_counts(r for r in results.records if r.suite == suite)
        rows.append([suite] + [counts[o] for o in OUTCOMES])
    lines = [tabulate(rows, headers=["suite", *OUTCOMES], tablefmt="github")]
    for r in results.records:
        if r.outcome in ("failed", "error"):
            lines.append(f"{r.outcome.upper()} {r.id}: {r.reason or 'no reason given'}")
    return lines


def run_suites(opts: RunOptions) -> int:
    suites_dir = _check_inputs(opts)
    names = opts.suites or (CHECKPOINT_SUITES if opts.checkpoint is not None
                            else DEFAULT_SUITES)
    files, skipped = suite_files(names, suites_dir)
    for line in skipped:
        print(f"llava-harness run: {line}", file=sys.stderr)
    if not files:
        raise RunError(f"none of the suites {', '.join(names)} exists under {suites_dir}")
    baseline = _baseline(opts)
    run_id = opts.run_id or new_run_id()
    run_folder = Path(opts.report_dir) / run_id
    # pytest runs in the user's folder (relative paths after `--` mean what they say there);
    # pytest-benchmark's storage, which it creates at every start, goes into the run folder.
    cmd = pytest_command(files, opts, run_id)
    storage = run_folder / ".benchmarks"
    if not any(a.startswith("--benchmark-storage") for a in opts.pytest_args):
        cmd.append(f"--benchmark-storage=file://{storage.absolute()}")
    # pytest-benchmark's own JSON beside ours, so `pytest-benchmark compare` reads a run too.
    benchmark_json = None
    if not any(a.startswith("--benchmark-json") for a in opts.pytest_args):
        benchmark_json = run_folder / "benchmark.json"
        cmd.append(f"--benchmark-json={benchmark_json.absolute()}")
    code, tail = _stream(cmd, Path.cwd(), run_folder / "pytest.log")
    with contextlib.suppress(OSError):
        storage.rmdir()  # only when empty: nothing was saved there
    if benchmark_json is not None:
        _drop_if_no_benchmarks(benchmark_json)
    try:
        results = load_results(run_folder / "results.json")
    except ResultsError:
        last = next((t for t in reversed(tail) if t.strip()), "no output")
        raise RunError(f"pytest exited {code} without writing results ({last.strip()}); "
                       f"its output is in {run_folder / 'pytest.log'}") from None
    print("\n" + "\n".join(summarize(results)))
    gate_failed = _gate(opts, results, baseline)
    print(f"\nreport: {run_folder / 'report.md'}")
    if code == _PYTEST_NO_TESTS:
        print("llava-harness run: no test was selected; that is a failure", file=sys.stderr)
        verdict = 1
    elif code in (_PYTEST_USAGE, _PYTEST_INTERNAL):
        verdict = 2
    else:
        verdict = 1 if code or gate_failed else 0
    if opts.as_json:
        _print_verdict(verdict, code, results, run_folder, gate_failed)
    return verdict


def _drop_if_no_benchmarks(path: Path) -> None:
    """pytest-benchmark 4 creates its JSON file when it parses its options and leaves it empty
    when no benchmark ran; 5 writes none. A run folder holds one only when it holds figures,
    whichever is installed."""
    try:
        text = path.read_text()
        empty = not text.strip() or not json.loads(text).get("benchmarks")
    except (OSError, ValueError, AttributeError):
        return
    if empty:
        path.unlink()


def _print_verdict(verdict: int, code: int, results, run_folder: Path, gate_failed: bool):
    from ..report.single import outcome_counts  # heavy: tabulate

    print_json({"exit": verdict, "pytest_exit": code, "run_id": results.run_id,
                "counts": dict(outcome_counts(results.records)), "gate_failed": gate_failed,
                "report": str(run_folder / "report.md"),
                "results": str(run_folder / "results.json"),
                "failed": [r.id for r in results.records if r.outcome in ("failed", "error")]})


def _baseline(opts: RunOptions):
    """The baseline to gate against: a results file, or with `auto` the committed baseline of
    this machine's class (none committed: the checks are skipped, saying so)."""
    if opts.baseline is None:
        return None
    if str(opts.baseline) != "auto":
        return load_results(opts.baseline)

    found = baseline_for(current())
    if found is None:
        print(f"llava-harness run: no baseline for this machine class "
              f"({machine_class(current())}) in fixtures/baselines/; relative checks are "
              "skipped", file=sys.stderr)
        opts.checks = [c for c in opts.checks if not c.needs_baseline]
        return None
    print(f"llava-harness run: gating against {found}", file=sys.stderr)
    return load_results(found)


def _gate(opts: RunOptions, results, baseline) -> bool:
    if not opts.checks:
        return False

    gate = evaluate(opts.checks, results, baseline, outcomes=False)
    warnings, lines = gate.printed(len(opts.checks))
    print(*warnings, sep="\n", file=sys.stderr, end="\n" if warnings else "")
    print(*lines, sep="\n")
    return not gate.ok
