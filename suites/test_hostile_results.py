"""Hostile results files: the commands that read runs gathered from a fleet (`report`, `compare`,
`gate`, `baseline`) refuse every crafted file with one stderr line naming it and the fault, exit
code 2, no traceback, nothing written (no report folder, no `compare` folder, the default one
included, no baseline) and the input's bytes unchanged, in bounded memory.

The classes, each crafted from a file the harness wrote itself: bare NaN / Infinity /
-Infinity (a value or a sample value), a non-finite or non-number sample value, a 5,000-digit
integer, `1e999999`, JSON nested 100,000 deep, a control or format character (newline, escape,
carriage return, bidi override) in a case, suite, metric name, unit, run id or environment
field, an environment field of the wrong type, an over-long name, a lone surrogate, and a file
one byte over the size cap. Each is paired with a valid variant of the same edit (the harness's
own "NaN" string, a long but legal number, a space for the newline, exactly the cap...) that
every command accepts, so each refusal is shown to be what its check catches.
"""

from __future__ import annotations

import hashlib
import json
import math
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.cli.app import main
from harness.report import results as results_module
from harness.report.environment import Environment
from harness.report.results import (
    MAX_NAME_CHARS,
    MAX_RESULTS_BYTES,
    Metric,
    Record,
    Results,
    ResultsError,
    load_results,
    write_results,
)

ERROR_PREFIX = "llava-harness: error: "
EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT = 0, 1, 2
COMMANDS = ("report", "compare", "gate", "baseline")
DOCUMENTED_CAP = 8 * 2**20          # docs/reports.md: "larger than **8 MiB**"
HUGE_BYTES = 200 * 2**20            # the valid 200 MB file that cost 2.5 GB before the cap
UNREAD_PEAK_BYTES = 2**20           # refused by its size: nothing of it is read
SMALL_CAP_MARGIN = 1024             # the matrix's cap: the valid file plus this

ENV = Environment(hostname="ci", cpu_model="Test CPU", cpu_count=2, python="3.11.7",
                  libraries={"torch": "2.13.0"}, git_commit="a" * 40, git_dirty=False)
STAMP = "2026-12-07T10:00:00.000000+00:00"


def legitimate() -> Results:
    """A run as the harness writes it: a timing with its sample, a count, a value stored as the
    string "NaN", a failure whose reason spans lines, settings and suite descriptions."""
    timing = Metric.of([0.125, 0.0625, 0.25], "s")
    records = (Record("figures", "test_extract[bin]", "passed", None,
                      {"wall_s": timing, "drift": Metric(math.nan, "ratio"),
                       "tensors": Metric(27, "count")}, STAMP),
               Record("figures", "test_strip", "failed", "AssertionError: 3 != 4\n  in shard 2",
                      {}, STAMP))
    return Results("run-a", ENV, records, STAMP,
                   suite_descriptions={"figures": "Each operation timed."},
                   settings={"checkpoint": "synthetic (tiny preset)"})


def js(text: str) -> str:
    """A JSON string literal: control characters escaped as a crafted file would hold them."""
    return json.dumps(text)


@dataclass(frozen=True)
class Hostile:
    """One edit of the legitimate file's text (first occurrence of `old`): `bad` must be
    refused with `phrase` in the message, `good` (the same edit, legal) accepted."""

    name: str
    old: str
    bad: str
    good: str
    phrase: str

    def apply(self, text: str, new: str) -> str:
        assert self.old in text, self.old
        return text.replace(self.old, new, 1)


OVER_THE_CAP = "over-the-cap"  # pads the file instead: one byte past the cap, or exactly to it

HOSTILE = [
    # The valid variants: the harness's own encoding of the same value, a string.
    Hostile("bare-nan", '"value": "NaN"', '"value": NaN', '"value": "NaN"', "bare NaN"),
    Hostile("bare-infinity", '"value": "NaN"', '"value": Infinity', '"value": "Infinity"',
            "bare Infinity"),
    Hostile("bare-minus-infinity", '"value": "NaN"', '"value": -Infinity',
            '"value": "-Infinity"', "bare -Infinity"),
    Hostile("sample-bare-infinity", "0.0625", "Infinity", "6.25e-2", "bare Infinity"),
    Hostile("sample-overflow", "0.0625", "1e999", "6.25e-2", "beyond a float's range"),
    Hostile("sample-nan-string", "0.0625", '"NaN"', "0.06250", "not a finite number"),
    Hostile("5000-digit-int", '"value": 27', '"value": ' + "9" * 5000,
            '"value": ' + "9" * 39, "5,000 characters"),
    Hostile("float-overflow", '"value": 27', '"value": 1e999999', '"value": 1e308',
            "beyond a float's range"),
    Hostile("nested-100000-deep", '"value": 27', '"value": ' + "[" * 100_000 + "]" * 100_000,
            '"value": 27', "nested too deeply"),
    Hostile("case-newline", '"case": "test_strip"', '"case": ' + js("test_strip\nFAIL x::y"),
            '"case": ' + js("test_strip FAIL x::y"), "record case"),
    Hostile("suite-escape", '"suite": "figures"', '"suite": ' + js("figures\x1b[2J"),
            '"suite": ' + js("figures[2J"), "\\x1b"),
    Hostile("metric-name-newline", '"tensors":', js("tensors\nx") + ":", js("tensors x") + ":",
            "metric name"),
    Hostile("unit-escape", '"unit": "count"', '"unit": ' + js("\x1b]0;pwned\x07count"),
            '"unit": "items"', "metric unit"),
    Hostile("run-id-carriage-return", '"run_id": "run-a"', '"run_id": ' + js("run-a\rrun-b"),
            '"run_id": "run-b"', "run id"),
    Hostile("record-run-id-bidi", '"case": "test_strip",',
            '"case": "test_strip", "run_id": ' + js("\u202erun-b") + ",",
            '"case": "test_strip", "run_id": "run-b",', "\\u202e"),
    Hostile("environment-newline", '"gpu_name": null', '"gpu_name": ' + js("H100\nFAIL"),
            '"gpu_name": "H100 FAIL"', "environment.gpu_name"),
    Hostile("environment-type", '"cpu_count": 2', '"cpu_count": "2"', '"cpu_count": 4',
            "environment.cpu_count"),
    Hostile("name-too-long", '"case": "test_strip"', '"case": ' + js("x" * (MAX_NAME_CHARS + 1)),
            '"case": ' + js("x" * MAX_NAME_CHARS), f"{MAX_NAME_CHARS + 1:,} characters"),
    Hostile("lone-surrogate", '"AssertionError', '"\\ud800AssertionError',
            '"\\ud83d\\ude00AssertionError', "lone surrogate"),
    Hostile(OVER_THE_CAP, "", "", "", "larger than"),
]


# --- files and commands ----------------------------------------------------------------------


@pytest.fixture
def valid(tmp_path) -> Path:
    path = tmp_path / "in" / "valid.json"
    path.parent.mkdir()
    write_results(legitimate(), path)
    return path


def craft(hostile: Hostile, valid: Path, good: bool, monkeypatch) -> Path:
    """The crafted (or, with `good`, the valid variant's) file beside `valid`."""
    text = valid.read_text(encoding="utf-8")
    if hostile.name == OVER_THE_CAP:
        cap = len(text.encode()) + SMALL_CAP_MARGIN   # a small cap keeps the test fast
        monkeypatch.setattr(results_module, "MAX_RESULTS_BYTES", cap)
        text += " " * (cap - len(text.encode()) + (0 if good else 1))
    else:
        text = hostile.apply(text, hostile.good if good else hostile.bad)
    path = valid.with_name(f"{hostile.name}{'-good' if good else ''}.json")
    path.write_text(text, encoding="utf-8")
    return path


def argv(command: str, crafted: Path, valid: Path, work: Path) -> list[str]:
    """`crafted` read by `command`, after a valid file where the command takes two; outputs
    in `work` (compare's default folder too: the tests run in `work`)."""
    return [str(a) for a in {
        "report": ["report", crafted, "-o", work / "report"],
        "compare": ["compare", valid, crafted],
        "gate": ["gate", valid, "--baseline", crafted, "--fail", "wall_s:<=1e9",
                 "--ignore-outcomes"],
        "baseline": ["baseline", crafted, "-o", work / "baseline.json"],
    }[command]]


def run_cli(capsys, args: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


# --- every class, every command --------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda h: h.name)
def test_a_hostile_results_file_is_one_line_exit_2_and_nothing_written(
        valid, work, capsys, monkeypatch, hostile, command):
    crafted = craft(hostile, valid, good=False, monkeypatch=monkeypatch)
    before = {p: digest(p) for p in (valid, crafted)}
    code, out, err = run_cli(capsys, argv(command, crafted, valid, work))
    assert code == EXIT_BAD_INPUT, f"exit {code}: {err}"
    assert out == "", out
    assert err.startswith(ERROR_PREFIX) and err.endswith("\n") and err.count("\n") == 1, err
    assert "internal error" not in err and "Traceback" not in err, err
    assert str(crafted) in err and hostile.phrase in err, err
    assert len(err) < 600, f"{len(err)} characters: {err[:200]}"
    assert list(work.iterdir()) == [], f"written: {sorted(work.iterdir())}"
    assert {p: digest(p) for p in before} == before, "an input changed"


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda h: h.name)
def test_the_valid_variant_of_each_edit_is_accepted_by_every_command(valid, work, capsys,
                                                                     monkeypatch, hostile):
    """The guard is what refuses the hostile file: the same edit, legal, passes every command
    (gate exits 1 only where the edit renamed a metric the run then lacks: a verdict)."""
    crafted = craft(hostile, valid, good=True, monkeypatch=monkeypatch)
    load_results(crafted)
    for command in COMMANDS:
        code, _, err = run_cli(capsys, argv(command, crafted, valid, work))
        allowed = (EXIT_OK, EXIT_GATE_FAILED) if command == "gate" else (EXIT_OK,)
        assert code in allowed and ERROR_PREFIX not in err, f"{command}: exit {code}: {err}"
    assert (work / "report" / "report.md").is_file() and (work / "baseline.json").is_file()
    assert [p.name for p in work.glob("reports/compare-*/compare.md")] == ["compare.md"]


# --- the size cap and memory -----------------------------------------------------------------


def test_the_cap_is_the_documented_one():
    assert MAX_RESULTS_BYTES == DOCUMENTED_CAP
    docs = Path(__file__).resolve().parent.parent / "docs" / "reports.md"
    if not docs.is_file():
        pytest.skip("an installed harness: the documentation stays in the checkout")
    assert "larger than **8 MiB** (`MAX_RESULTS_BYTES`)" in docs.read_text()


def peak_while(work) -> int:
    """tracemalloc's peak (bytes) while `work()` runs."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def refused(path: Path, phrase: str):
    def work():
        with pytest.raises(ResultsError) as info:
            load_results(path)
        assert str(path) in str(info.value) and phrase in str(info.value), info.value
    return work


def test_an_over_cap_file_is_refused_by_its_size_without_reading_it(tmp_path, valid):
    """A valid file padded one byte past the real cap, and a sparse 200 MB one (it cost 2.5 GB
    before the cap): each refused with less than 1 MiB traced, nothing of it read."""
    over = tmp_path / "over.json"
    over.write_bytes(valid.read_bytes().ljust(MAX_RESULTS_BYTES + 1, b" "))
    huge = tmp_path / "huge.json"
    with huge.open("wb") as f:
        f.truncate(HUGE_BYTES)
    for path in (over, huge):
        assert peak_while(refused(path, "larger than 8,388,608 bytes")) < UNREAD_PEAK_BYTES


def test_a_source_without_a_size_is_read_one_byte_past_the_cap_at_most(tmp_path):
    """/dev/zero says size 0 and never ends: the read stops one byte past the cap."""
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero on this system")
    peak = peak_while(refused(Path("/dev/zero"), "larger than"))
    assert MAX_RESULTS_BYTES < peak < 2 * MAX_RESULTS_BYTES


def test_a_file_at_exactly_the_cap_loads(tmp_path, valid):
    at_cap = tmp_path / "at-cap.json"
    at_cap.write_bytes(valid.read_bytes().ljust(MAX_RESULTS_BYTES, b" "))
    assert load_results(at_cap) == legitimate()


# --- what stays legal ------------------------------------------------------------------------


def test_the_harness_own_non_finite_strings_still_load(tmp_path):
    """The harness writes NaN and the infinities as strings: those files still round-trip."""
    run = Results("run-a", ENV, (Record("s", "c", "passed", None, {
        "nan": Metric(math.nan, "ratio"), "inf": Metric(math.inf, "s"),
        "neg": Metric(-math.inf, "s")}, STAMP),), STAMP)
    path = tmp_path / "nonfinite.json"
    write_results(run, path)
    text = path.read_text()
    assert '"value": "NaN"' in text and '"value": "-Infinity"' in text
    back = load_results(path)
    assert back == run and back.to_json() == text


# --- compare and report write only once everything is read and rendered ---------------------


def test_compare_leaves_no_folder_when_it_fails_midway(valid, work, capsys, monkeypatch):
    """A failure after the chart was written (here, the markdown's write) leaves no folder:
    a new folder appears complete or not at all."""
    import harness.report.compare_folder as compare_folder

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device", "compare.md")

    monkeypatch.setattr(compare_folder, "atomic_file", broken)
    code, _, err = run_cli(capsys, ["compare", str(valid), str(valid), "-o", str(work / "c")])
    assert code == EXIT_BAD_INPUT and "No space left" in err, err
    assert list(work.iterdir()) == []


def test_report_renders_before_it_makes_its_folder(valid, work, capsys, monkeypatch):
    import harness.report.single as single

    def broken(results):
        raise ResultsError("cannot render")

    monkeypatch.setattr(single, "render_report", broken)
    code, _, err = run_cli(capsys, ["report", str(valid), "-o", str(work / "r")])
    assert code == EXIT_BAD_INPUT and "cannot render" in err, err
    assert list(work.iterdir()) == []
