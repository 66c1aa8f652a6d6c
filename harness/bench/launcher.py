"""One way to start a benchmark's child: a harness function, or the harness's own command line,
in a fresh process, measured (wall time, peak RSS, peak anonymous memory: measure.py), with a
timeout.

A fresh process keeps the parent's imports, caches and allocator state out of the figures.
The child is `python -P -m harness.bench.child MODULE:FUNCTION ARGS_JSON` (child.py), or
`python -P -m harness.cli ARGS` for a command as users run it. Either imports the same harness
as the parent: the folder holding the parent's `harness` package leads the child's PYTHONPATH
(tests run with PYTHONPATH pointing at a checkout, or from a checkout pytest put on sys.path),
and `-P` keeps the child's working folder, which may hold another checkout, off its sys.path.

Not the launcher for `ab` (ab.py): ab starts ab_child.py *by path* with another side's
interpreter on purpose, so that side's own harness is measured, not this one.
"""

from __future__ import annotations

import json
import os
import site
import sys
from pathlib import Path

from . import child
from .measure import BenchError, Measured, run_measured

# A child still running after this long is killed. A hung child (a deadlock, a stalled read)
# would otherwise hold a shared machine for good; hours, because LLaVA's naive merge of a
# real-size checkpoint on a slow disk takes tens of minutes.
CHILD_TIMEOUT_S = 4 * 3600
# The folder that holds the `harness` package this process runs.
HARNESS_ROOT = str(Path(__file__).resolve().parents[2])


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus `extra`, with HARNESS_ROOT first on PYTHONPATH unless it
    is the interpreter's own site-packages (there, putting it before the standard library would
    change more than which harness is found)."""
    env = {**os.environ, **(extra or {})}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    installed = {str(Path(p).resolve()) for p in
                 [*site.getsitepackages(), site.getusersitepackages()]}
    if HARNESS_ROOT not in installed and paths[:1] != [HARNESS_ROOT]:
        env["PYTHONPATH"] = os.pathsep.join([HARNESS_ROOT, *paths])
    return env


def _run(argv: list[str], env: dict[str, str] | None, stdout: Path | None,
         timeout_s: float | None) -> Measured:
    return run_measured([sys.executable, "-P", "-m", *argv], env=child_env(env), stdout=stdout,
                        timeout_s=timeout_s)


def launch(func, *args, env: dict[str, str] | None = None, stdout: Path | None = None,
           timeout_s: float | None = CHILD_TIMEOUT_S) -> Measured:
    """`func(*args)` in a fresh process, measured. `func` is a module-level function of the
    harness (the child imports it by name); `args` travel as JSON, so they are strings, numbers,
    lists and dicts. `env` adds variables to the child's environment; the child's stdout goes to
    the file `stdout`, else nowhere."""
    target = f"{func.__module__}:{func.__qualname__}"
    if not func.__module__.startswith("harness.") or "." in func.__qualname__:
        raise BenchError(f"{target}: a child runs a module-level function of the harness")
    return _run([child.__name__, target, json.dumps(args)], env, stdout, timeout_s)


def launch_cli(*argv: str, stdout: Path | None = None,
               timeout_s: float | None = CHILD_TIMEOUT_S) -> Measured:
    """`llava-harness ARGV` in a fresh process, measured: the command as users run it."""
    return _run(["harness.cli", *argv], None, stdout, timeout_s)
