"""The regression gate: every check form parses (and every bad one fails at argument time,
naming the text), relative checks fail on a planted regression in the direction they name and
pass without one, a metric lost from a run fails, and baselines are only written from and into
a clean git tree. From the CLI (`llava-harness gate`) and from pytest (`--llava-fail`)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.cli.app import main
from harness.report.environment import Environment
from harness.report.gate import GateError, evaluate, parse_check, write_baseline
from harness.report.results import Metric, Record, Results, load_results, write_results
from harness.report.speed import PROBE_METRIC

ENV = Environment(hostname="ci", cpu_model="Test CPU", cpu_count=2, python="3.11.7",
                  libraries={"torch": "2.13.0"}, git_commit="a" * 40, git_dirty=False)


def run_of(*cases, env=ENV, run_id="run-1") -> Results:
    """cases: (suite, case, {metric: (value, unit, direction)}, outcome)."""
    records = [Record(suite, case, outcome, None if outcome == "passed" else "why",
                      {n: Metric(*spec) for n, spec in metrics.items()}, "t")
               for suite, case, metrics, outcome in cases]
    return Results(run_id, env, tuple(records), "t")


# A memory figure: relative limits apply to it exactly (timings get run-to-run noise on top,
# tested on their own below).
def one(value, name="peak_rss", unit="MiB", direction="lower", case="c1", outcome="passed"):
    return run_of(("extraction", case, {name: (value, unit, direction)}, outcome))


# --- parsing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, kind, op, amount, metric, case", [
    ("peak_rss:+5%", "relative", "rise", 0.05, "peak_rss", None),
    ("decode_tokens_per_s:-10%", "relative", "fall", 0.10, "decode_tokens_per_s", None),
    ("drift:±2.5%", "relative", "both", 0.025, "drift", None),
    ("drift:~2.5%", "relative", "both", 0.025, "drift", None),
    ("wall_s:5%", "relative", "worse", 0.05, "wall_s", None),
    ("extract_wall_s:<=0.5", "absolute", "<=", 0.5, "extract_wall_s", None),
    ("x:<0.5", "absolute", "<", 0.5, "x", None),
    ("x:>=10", "absolute", ">=", 10.0, "x", None),
    ("x:>1e3", "absolute", ">", 1000.0, "x", None),
    ("x:==0", "absolute", "==", 0.0, "x", None),
    ("x:>=-2.5", "absolute", ">=", -2.5, "x", None),
    ("*_wall_s@extraction::*bin*:+20%", "relative", "rise", 0.20, "*_wall_s",
     "extraction::*bin*"),
    (" peak_rss @ c1 : +5% ", "relative", "rise", 0.05, "peak_rss", "c1"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_every_check_form_parses(text, kind, op, amount, metric, case):
    check = parse_check(text)
    assert (check.kind, check.op, check.metric, check.case) == (kind, op, metric, case)
    assert math.isclose(check.amount, amount)


@pytest.mark.parametrize("text, words", [
    ("", ["expected METRIC"]),
    ("peak_rss", ["expected METRIC"]),
    ("peak_rss:", ["limit ''"]),
    (":+5%", ["no metric"]),
    ("peak_rss@:+5%", ["no case pattern"]),
    ("peak_rss:+5", ["limit '+5'"]),
    ("peak_rss:5%%", ["limit '5%%'"]),
    ("peak_rss:+-5%", ["limit '+-5%'"]),
    ("peak_rss:<=abc", ["limit '<=abc'"]),
    ("peak_rss:=>1", ["limit '=>1'"]),
    ("peak_rss:<=inf", ["limit '<=inf'"]),
    ("peak_rss:five%", ["limit 'five%'"]),
], ids=["empty", "no-colon", "no-limit", "no-metric", "empty-case", "percent-missing",
        "double-percent", "two-signs", "bound-not-a-number", "reversed-operator", "infinite",
        "words"])
def test_bad_checks_name_the_text(text, words):
    with pytest.raises(GateError) as info:
        parse_check(text)
    message = str(info.value)
    assert repr(text) in message and all(w in message for w in words), message


def test_bad_check_fails_at_argument_time_in_the_cli(tmp_path, capsys):
    # The results file does not exist: argparse must reject the check before reading it.
    with pytest.raises(SystemExit) as info:
        main(["gate", str(tmp_path / "absent.json"), "--fail", "peak_rss:+5"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "peak_rss:+5" in err and "absent.json" not in err
    assert len(err.strip().splitlines()) == 1


# --- evaluation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("check, base, value, ok", [
    ("peak_rss:+5%", 1.0, 1.049, True), ("peak_rss:+5%", 1.0, 1.06, False),
    ("peak_rss:+5%", 1.0, 0.2, True),       # a large improvement is no regression
    ("peak_rss:-10%", 100.0, 90.5, True), ("peak_rss:-10%", 100.0, 89.0, False),
    ("peak_rss:-10%", 100.0, 500.0, True),
    ("peak_rss:±5%", 1.0, 0.94, False), ("peak_rss:±5%", 1.0, 1.06, False),
    ("peak_rss:±5%", 1.0, 1.04, True),
    ("peak_rss:<=0.5", None, 0.5, True), ("peak_rss:<0.5", None, 0.5, False),
    ("peak_rss:>=2", None, 2, True), ("peak_rss:>2", None, 2, False),
    ("peak_rss:==3", None, 3, True), ("peak_rss:==3", None, 3.5, False),
    ("peak_rss:<=0.5", None, math.nan, False),
], ids=lambda v: str(v))
def test_checks_pass_and_fail_where_they_should(check, base, value, ok):
    baseline = one(base) if base is not None else None
    gate = evaluate([parse_check(check)], one(value), baseline)
    assert gate.ok is ok, gate.lines()
    assert gate.checked == 1


@pytest.mark.parametrize("direction, worse, better", [("lower", 1.2, 0.8),
                                                      ("higher", 0.8, 1.2),
                                                      ("none", 1.2, None)])
def test_unsigned_percent_means_worse_in_the_metrics_own_direction(direction, worse, better):
    check = [parse_check("m:10%")]
    base = one(1.0, "m", "x", direction)
    assert not evaluate(check, one(worse, "m", "x", direction), base).ok
    if better is not None:
        assert evaluate(check, one(better, "m", "x", direction), base).ok
    else:  # no better direction: two-sided
        assert not evaluate(check, one(0.8, "m", "x", direction), base).ok


def test_planted_regression_fails_with_one_line_naming_everything():
    base = run_of(("extraction", "bin-last", {"peak_rss": (300.0, "MiB", "lower"),
                                              "extract_wall_s": (0.25, "s", "lower")}, "passed"),
                  ("quant", "nf4", {"decode_tokens_per_s": (20.0, "tokens/s", "higher")},
                   "passed"))
    checks = [parse_check(t) for t in ("peak_rss:+5%", "decode_tokens_per_s:-10%",
                                       "extract_wall_s:<=0.5")]
    assert evaluate(checks, base, base).ok  # the baseline against itself: no regression
    regressed = run_of(("extraction", "bin-last", {"peak_rss": (330.0, "MiB", "lower"),
                                                   "extract_wall_s": (0.75, "s", "lower")},
                        "passed"),
                       ("quant", "nf4", {"decode_tokens_per_s": (10.0, "tokens/s", "higher")},
                        "passed"))
    lines = evaluate(checks, regressed, base).lines()
    assert len(lines) == 3, lines
    rss = next(line for line in lines if "peak_rss" in line)
    for part in ("extraction::bin-last", "peak_rss", "330", "MiB", "baseline 300", "<= 315",
                 "peak_rss:+5%"):
        assert part in rss, rss
    # A rate is a timing: 10% plus the run-to-run noise of tolerances.toml below 20.
    assert any("decode_tokens_per_s" in line and ">= 12 (10% + noise 6)" in line
               for line in lines), lines
    assert any("extract_wall_s" in line and "<= 0.5" in line for line in lines)


def test_case_pattern_limits_a_check():
    base = run_of(("s", "fast", {"t": (1.0, "s", "lower")}, "passed"),
                  ("s", "slow", {"t": (1.0, "s", "lower")}, "passed"))
    now = run_of(("s", "fast", {"t": (1.0, "s", "lower")}, "passed"),
                 ("s", "slow", {"t": (9.0, "s", "lower")}, "passed"))
    assert evaluate([parse_check("t@s::fast:+5%")], now, base).ok
    assert not evaluate([parse_check("t@slow:+5%")], now, base).ok


def test_metric_lost_from_the_run_fails():
    base = one(1.0)
    skipped = run_of(("extraction", "c1", {}, "skipped"))
    lines = evaluate([parse_check("peak_rss:+5%")], skipped, base).lines()
    assert len(lines) == 1 and "missing" in lines[0] and "skipped in this run" in lines[0]


def test_new_cases_are_not_checked_but_said():
    base = run_of(("s", "old", {"t": (1.0, "s", "lower")}, "passed"))
    now = run_of(("s", "old", {"t": (1.0, "s", "lower")}, "passed"),
                 ("s", "new", {"t": (50.0, "s", "lower")}, "passed"))
    gate = evaluate([parse_check("t:+5%")], now, base)
    assert gate.ok and gate.checked == 1
    assert gate.warnings == ["t:+5%: 1 value(s) not in the baseline, not checked (e.g. s::new t)"]


def test_check_matching_nothing_fails():
    gate = evaluate([parse_check("no_such_metric:<=1")], one(0.1))
    assert not gate.ok and "matches no metric" in gate.lines()[0]


def test_relative_check_needs_a_baseline():
    with pytest.raises(GateError, match="needs a baseline"):
        evaluate([parse_check("peak_rss:+5%")], one(1.0))


def test_failed_cases_fail_the_gate_unless_ignored():
    run = one(0.1, outcome="failed")
    assert "FAIL extraction::c1: failed" in evaluate([parse_check("peak_rss:<=1")], run).lines()[0]
    assert evaluate([parse_check("peak_rss:<=1")], run, outcomes=False).ok


def test_different_environments_warn():
    other = dataclasses.replace(ENV, gpu_name="NVIDIA H100 80GB HBM3", gpu_count=1)
    run = run_of(("extraction", "c1", {"peak_rss": (1.0, "MiB", "lower")}, "passed"), env=other)
    gate = evaluate([parse_check("peak_rss:+5%")], run, one(1.0))
    assert gate.ok and any("gpu_name" in w for w in gate.warnings)


# --- CLI -------------------------------------------------------------------------------------

def test_cli_gate_exit_codes(tmp_path, capsys):
    base, good, bad = tmp_path / "base.json", tmp_path / "good.json", tmp_path / "bad.json"
    write_results(one(1.0), base)
    write_results(one(1.01), good)
    write_results(one(2.0), bad)
    assert main(["gate", "--baseline", str(base), str(good), "--fail", "peak_rss:+5%"]) == 0
    assert main(["gate", "--baseline", str(base), str(bad), "--fail", "peak_rss:+5%"]) == 1
    out = capsys.readouterr().out
    assert "FAIL extraction::c1 peak_rss: value 2 MiB, baseline 1 MiB, limit <= 1.05" in out
    (tmp_path / "v2.json").write_text(base.read_text().replace('"schema_version": 1',
                                                               '"schema_version": 2'))
    assert main(["gate", str(tmp_path / "v2.json"), "--fail", "peak_rss:<=1"]) == 2
    err = capsys.readouterr().err
    assert "v2.json" in err and "schema version 2" in err and len(err.splitlines()) == 1


# --- baselines -------------------------------------------------------------------------------

def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "fixtures" / "baselines").mkdir(parents=True)
    (repo / "README").write_text("x")
    git(repo, "init", "-q")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    return repo


def test_baseline_is_written_from_a_clean_tree(repo, tmp_path):
    results = tmp_path / "results.json"
    write_results(one(1.0), results)
    target = repo / "fixtures" / "baselines" / "cpu.json"
    write_baseline(results, target)
    assert load_results(target) == one(1.0)
    with pytest.raises(FileExistsError):
        write_baseline(results, target)


def test_cli_baseline_refuses_a_dirty_tree_in_one_line(repo, tmp_path, capsys):
    results = tmp_path / "results.json"
    write_results(one(1.0), results)
    target = repo / "fixtures" / "baselines" / "cpu.json"
    assert main(["baseline", str(results), "-o", str(target)]) == 0
    assert capsys.readouterr().out == f"baseline: {target}\n"
    # The new baseline is uncommitted: the tree is dirty now, so a second one is refused.
    assert main(["baseline", str(results), "-o", str(target.with_name("b.json"))]) == 2
    err = capsys.readouterr().err
    assert "uncommitted changes" in err and err.count("\n") == 1


def test_cli_baseline_defaults_to_beside_the_run_and_dash_is_stdout(tmp_path, capsys):
    run = tmp_path / "reports" / "r1"
    run.mkdir(parents=True)
    write_results(one(1.0), run / "results.json")
    assert main(["baseline", str(run / "results.json")]) == 0
    assert capsys.readouterr().out == f"baseline: {run / 'baseline.json'}\n"
    assert load_results(run / "baseline.json") == one(1.0)
    assert main(["baseline", str(run / "results.json"), "-o", "-"]) == 0
    out = capsys.readouterr().out
    assert Results.from_json(out, "stdout") == one(1.0)  # stdout holds the JSON alone


def test_a_baseline_git_ignores_needs_no_clean_tree(repo, tmp_path):
    """reports/ is ignored: a baseline written there is never committed, so a dirty tree
    (the usual state while working) does not stop it; a tracked target still needs one."""
    (repo / ".gitignore").write_text("reports/\n")
    (repo / "README").write_text("changed")
    results = tmp_path / "results.json"
    write_results(one(1.0), results)
    target = repo / "reports" / "run" / "baseline.json"
    write_baseline(results, target)
    assert load_results(target) == one(1.0)
    with pytest.raises(GateError, match="uncommitted changes"):
        write_baseline(results, repo / "fixtures" / "baselines" / "cpu.json")


def test_baseline_refuses_a_dirty_tree(repo, tmp_path):
    results = tmp_path / "results.json"
    write_results(one(1.0), results)
    (repo / "README").write_text("changed")
    target = repo / "fixtures" / "baselines" / "cpu.json"
    with pytest.raises(GateError, match="uncommitted changes"):
        write_baseline(results, target)
    assert not target.exists()


def test_baseline_refuses_a_run_made_from_a_dirty_tree(repo, tmp_path):
    results = tmp_path / "results.json"
    write_results(run_of(("s", "c", {}, "passed"),
                         env=dataclasses.replace(ENV, git_dirty=True)), results)
    with pytest.raises(GateError, match="uncommitted changes"):
        write_baseline(results, repo / "fixtures" / "baselines" / "cpu.json")


# --- from pytest ------------------------------------------------------------------------------

TEST_FILE = textwrap.dedent("""
    def test_measured(llava_record):
        llava_record("wall_s", {value}, "s")
""")


def run_pytest(tmp_path, value, *args):
    (tmp_path / "test_measured.py").write_text(TEST_FILE.format(value=value))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path / "test_measured.py"), "--rootdir", str(tmp_path),
                           *args], check=False, capture_output=True, text=True,
                          cwd=tmp_path)


def test_pytest_gate_fails_on_a_planted_regression(tmp_path):
    baseline = tmp_path / "base.json"
    write_results(run_of(("measured", "test_measured", {"wall_s": (1.0, "s", "lower")},
                          "passed")), baseline)
    args = ["--llava-baseline", str(baseline), "--llava-fail", "wall_s:+5%"]
    ok = run_pytest(tmp_path, 1.0, *args)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "all 1 check(s) passed" in ok.stdout
    bad = run_pytest(tmp_path, 2.0, *args)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL measured::test_measured wall_s: value 2 s, baseline 1 s" in bad.stdout


def test_pytest_rejects_a_bad_check_at_parse_time(tmp_path):
    done = run_pytest(tmp_path, 1.0, "--llava-fail", "peak_rss:+5")
    assert done.returncode == 4 and "peak_rss:+5" in done.stderr


def test_pytest_rejects_a_baseline_of_another_schema(tmp_path):
    baseline = tmp_path / "base.json"
    write_results(one(1.0), baseline)
    data = json.loads(baseline.read_text())
    data["schema_version"] = 99
    baseline.write_text(json.dumps(data))
    done = run_pytest(tmp_path, 1.0, "--llava-baseline", str(baseline))
    assert done.returncode == 4 and "schema version 99" in done.stderr


# --- noise ------------------------------------------------------------------------------------

def timing(values, case="c1") -> Results:
    record = Record("figures", case, "passed", None, {"bench_s": Metric.of(values, "s")}, "t")
    return Results("run-1", ENV, (record,), "t")


def test_a_timing_moves_within_its_noise_and_a_2x_regression_still_fails():
    """Relative limits apply beyond the noise: the measured spread, at least the run-to-run
    shift stated in tolerances.toml. Two runs of the same code (a 20% shift, as measured between
    runs here) pass a ±5% gate; the same figure twice as slow fails it, naming the noise."""
    base = timing([1.00, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97])
    same_code = timing([1.20, 1.22, 1.18, 1.21, 1.19, 1.23, 1.17])
    twice = timing([2.00, 2.04, 1.96, 2.02, 1.98, 2.06, 1.94])
    check = [parse_check("bench_s:±5%")]
    assert evaluate(check, same_code, base).ok
    lines = evaluate(check, twice, base).lines()
    assert len(lines) == 1 and "noise" in lines[0] and "value 2 s" in lines[0], lines
    # A memory figure gets no run-to-run allowance: 5% is 5%.
    assert not evaluate([parse_check("peak_rss:+5%")], one(1.06), one(1.0)).ok


def test_beyond_the_limit_fails_only_where_the_rank_test_agrees():
    """Both sides carry samples of 5+ values: a median beyond the limit that the two samples
    do not significantly differ on (Mann-Whitney U at 0.01) passes, and says so; a real shift
    fails with the test's figures on its line (the exact p of 7 against 7 fully separated is
    2/3432). The limit says how big, the test that it is not noise: the same 1.4x median jump,
    once from a sample that overlaps the baseline's."""
    base = timing([1.00, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97])
    # Median 1.4, beyond +5% widened by the 30% floor (1.35); but three values sit in the
    # baseline's range: the samples do not separate.
    overlapping = timing([0.97, 0.99, 1.01, 1.40, 1.41, 1.45, 1.50])
    shifted = timing([1.38, 1.40, 1.42, 1.41, 1.39, 1.43, 1.37])
    check = [parse_check("bench_s:+5%")]
    passed = evaluate(check, overlapping, base)
    assert passed.ok and len(passed.not_significant) == 1
    assert "Mann-Whitney U" in passed.notes[0] and "do not differ significantly" in \
        passed.notes[0]
    failed = evaluate(check, shifted, base)
    (line,) = failed.lines()
    assert "Mann-Whitney U" in line and "p=0.00058" in line and "x1.400" in line, line
    # Fewer than 5 values a side: no test, the limit alone decides (as before).
    assert not evaluate(check, timing([1.38, 1.40, 1.42, 1.41]), timing([1.0, 1.01, 0.99,
                                                                         1.02])).ok


def test_the_range_widens_by_the_baselines_spread_not_the_runs():
    """The baseline's IQR is the yardstick: a regression that also makes the new run noisier
    must not widen its own range. The run's spread counts only where the baseline has none."""
    from harness.report.gate import noise_of, run_to_run_noise

    narrow, wide = Metric.of([1.0, 1.0, 1.0, 1.0], "s"), Metric.of([0.8, 0.9, 1.1, 1.2], "s")
    assert wide.spread == pytest.approx(0.25)  # q3 1.125 - q1 0.875 (linear quartiles)
    floor = run_to_run_noise()
    assert floor > 0.25  # so the floor counts below, not the IQR
    assert noise_of(narrow, wide) == pytest.approx(floor * 1.0)  # (run, baseline)
    assert noise_of(wide, narrow) == pytest.approx(floor * 1.0)
    assert noise_of(wide, Metric(1.0, "s")) == pytest.approx(floor * 1.0)
    # A pooled baseline whose IQR is wider than the floor: the IQR alone, not the two added
    # (the between-run noise would count twice).
    pooled = Metric.of([0.4, 0.7, 1.3, 1.6], "s")
    assert pooled.spread > floor
    assert noise_of(narrow, pooled) == pytest.approx(pooled.spread)
    counts = Metric(7, "count")
    assert noise_of(counts, counts) == 0.0  # an exact figure has no noise


# --- machine speed ----------------------------------------------------------------------------

def probed(values, probe, name="bench_s", unit="s", case="c1") -> Results:
    """A figure with the machine-speed probe measured around it (speed.py)."""
    metrics = {name: Metric.of(values, unit)}
    if probe is not None:
        metrics[PROBE_METRIC] = Metric.of(probe, "s")
    return Results("run-1", ENV, (Record("figures", case, "passed", None, metrics, "t"),), "t")


BASE_FIGURE = [1.00, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97]
BASE_PROBE = [0.0040, 0.0041, 0.0039, 0.0040]


def times(values, factor):
    return [v * factor for v in values]


def test_a_slower_machine_is_judged_at_the_speed_it_ran_the_probe():
    """What CI met: the same code on a VM of the same class, every figure ~1.78x the
    baseline's. Unscaled, `+20%` fails it; with the probe measured 1.75x slower around the
    figure, the baseline is taken at that speed and it passes, saying so."""
    check = [parse_check("bench_s:+20%")]
    base = probed(BASE_FIGURE, BASE_PROBE)
    slow_machine = probed(times(BASE_FIGURE, 1.78), times(BASE_PROBE, 1.75))
    assert not evaluate(check, probed(times(BASE_FIGURE, 1.78), None), base).ok
    gate = evaluate(check, slow_machine, base)
    assert gate.ok, gate.lines()
    assert gate.scales == {"figures::c1": pytest.approx(1.75)}
    assert gate.notes == ["timings of 1 case(s) judged at this machine's speed: the probe "
                          "took x1.75 the baseline's time"]


def test_a_regression_still_fails_at_full_size_on_any_machine():
    """The probe does none of the harness's work, so a code change does not move it: twice
    the time fails on the baseline's machine, on a machine 1.75x slower and on one 3x slower,
    and the failure names the scale it was judged at."""
    check = [parse_check("bench_s:+20%")]
    base = probed(BASE_FIGURE, BASE_PROBE)
    for speed in (1.0, 1.75, 3.0):
        run = probed(times(BASE_FIGURE, 2 * speed), times(BASE_PROBE, speed))
        lines = evaluate(check, run, base).lines()
        assert len(lines) == 1 and f"probe x{speed:.3g}" in lines[0], (speed, lines)


def test_a_faster_probe_does_not_tighten_the_range():
    """Where the machine ran the probe faster, the baseline is taken as measured: a writer
    figure's process-to-process shift (1.4-1.75x on one VM) does not follow the probe, and a
    shrunk baseline would fail unchanged code. So unchanged code passes on a machine that
    runs the probe in half the time; twice the baseline's time still fails there."""
    check = [parse_check("bench_s:+20%")]
    base = probed(BASE_FIGURE, BASE_PROBE)
    gate = evaluate(check, probed(times(BASE_FIGURE, 1.3), times(BASE_PROBE, 0.5)), base)
    assert gate.ok, gate.lines()
    assert gate.notes == ["timings of 1 case(s) judged at this machine's speed: the probe "
                          "took x0.5 the baseline's time; 1 case(s) where it ran faster are "
                          "held to the baseline as measured"]
    lines = evaluate(check, probed(times(BASE_FIGURE, 2), times(BASE_PROBE, 0.5)), base).lines()
    assert len(lines) == 1 and "probe x0.5, applied as x1" in lines[0], lines


def test_a_rate_is_divided_by_the_scale_and_other_figures_are_left_alone():
    """tokens/s fall on a slower machine: a third of the rate at three times the probe time
    passes; a third of the rate at the same probe time fails. Memory does not move with
    speed."""
    check = [parse_check("decode_tokens_per_s:-20%")]
    base = probed([100.0, 101, 99, 100], BASE_PROBE, "decode_tokens_per_s", "tokens/s")
    third = [33.3, 33.6, 33.0, 33.3]
    assert evaluate(check, probed(third, times(BASE_PROBE, 3), "decode_tokens_per_s",
                                  "tokens/s"), base).ok
    assert not evaluate(check, probed(third, BASE_PROBE, "decode_tokens_per_s", "tokens/s"),
                        base).ok
    memory = [parse_check("peak_rss:+5%")]
    base = probed([100.0] * 4, BASE_PROBE, "peak_rss", "MiB")
    assert not evaluate(memory, probed([110.0] * 4, times(BASE_PROBE, 2), "peak_rss", "MiB"),
                        base).ok


def test_the_probe_is_not_judged_at_its_own_scale():
    """A check that matches the probe compares it raw (at its own scale it would always
    pass)."""
    check = [parse_check(f"{PROBE_METRIC}:+20%")]
    base = probed(BASE_FIGURE, BASE_PROBE)
    assert not evaluate(check, probed(BASE_FIGURE, times(BASE_PROBE, 2)), base).ok


def test_a_baseline_without_the_probe_is_compared_unscaled_with_a_warning():
    check = [parse_check("bench_s:+20%")]
    gate = evaluate(check, probed(BASE_FIGURE, BASE_PROBE), probed(BASE_FIGURE, None))
    assert gate.ok and not gate.scales and not gate.notes
    assert any("compared unscaled" in w for w in gate.warnings), gate.warnings


def test_the_probe_does_the_same_work_every_call_and_leaves_no_trace(tmp_path):
    """Seconds per call, one per round; torch's thread count and the garbage collector
    restored; the scratch file gone; and its work touches nothing of the harness (the names
    it uses: stdlib and torch only)."""
    import gc

    import torch

    from harness.report import speed

    threads = torch.get_num_threads()
    values = speed.probe_times(tmp_path, rounds=3, calls=2)
    assert len(values) == 3 and all(0 < v < 5 for v in values)
    assert torch.get_num_threads() == threads and not list(tmp_path.iterdir())
    assert gc.isenabled()
    assert speed._work(tmp_path) == speed._work(tmp_path)
    used = set(speed._work.__code__.co_names)
    assert used <= {"torch", "json", "os", "open", "sorted", "bytes", "bytearray", "float",
                    "range", "enumerate", "len", "_KEYS", "_BLOCK", "loads", "dumps", "write",
                    "read_bytes", "stat", "frombuffer", "uint8", "reshape", "to", "float32",
                    "tanh", "sum"}, used


def test_every_committed_figure_carries_the_probe():
    """The committed baselines were recorded with the probe, so CI's gate judges figures at
    its machine's speed rather than warning and comparing raw."""
    from harness.data import fixtures_dir

    found = 0
    for path in sorted((fixtures_dir() / "baselines").glob("*.json")):
        for record in load_results(path).records:
            if "bench_s" in record.metrics:
                found += 1
                assert PROBE_METRIC in record.metrics, f"{path.name}: {record.id}"
    assert found >= 5


@pytest.mark.parametrize("limit", ["+1001%", "+" + "9" * 400 + "%", "±12345%"])
def test_a_limit_that_cannot_fail_is_refused(limit):
    with pytest.raises(GateError):
        parse_check(f"bench_s:{limit}")


def test_gate_and_compare_look_records_up_in_linear_time(monkeypatch, tmp_path):
    """20,000 records: lookups go through the index (a dict built once per run), so gate and
    compare cost time linear in the records. Counted, not timed: record lookups and index
    builds grow with n, never with n squared."""
    from harness.report import compare as compare_module

    def big(n, scale):
        recs = tuple(Record("s", f"c{i}", "passed", None,
                            {"bench_s": Metric.of([scale, scale * 1.01, scale * 0.99], "s")}, "t")
                     for i in range(n))
        return Results(f"r{scale}", ENV, recs, "t")

    calls = {"n": 0}
    real = Results.record

    def counted(self, suite, case):
        calls["n"] += 1
        return real(self, suite, case)

    monkeypatch.setattr(Results, "record", counted)
    builds = {"n": 0}
    real_index = Results._by_key.func

    def counted_index(self):
        builds["n"] += 1
        return real_index(self)

    monkeypatch.setattr(Results, "_by_key", functools.cached_property(counted_index))
    Results._by_key.__set_name__(Results, "_by_key")
    for n in (2_000, 20_000):
        a, b = big(n, 1.0), big(n, 1.1)
        calls["n"] = builds["n"] = 0
        assert evaluate([parse_check("bench_s:±5%")], b, a).ok
        gate_calls = calls["n"]
        calls["n"] = 0
        text = compare_module.render_comparison([a, b])
        assert text.count("same, within noise") == n
        assert gate_calls <= 3 * n and calls["n"] <= 6 * n, (n, gate_calls, calls["n"])
        assert builds["n"] <= 2  # each run indexed once, however many lookups


def test_a_machine_class_names_the_hardware_figures_belong_to():
    from harness.report.gate import machine_class

    cpu = dataclasses.replace(ENV, cpu_model="AMD EPYC", cpu_count=2, cpu_isa="avx512_bf16",
                              gpu_name=None, gpu_count=0)
    assert machine_class(cpu) == "cpu-2core-amd-epyc-avx512-bf16"
    gpu = dataclasses.replace(cpu, gpu_name="NVIDIA H200", gpu_count=1)
    assert machine_class(gpu) == "gpu-1x-nvidia-h200"


def test_run_with_baseline_auto_skips_relative_checks_without_a_baseline(monkeypatch, capsys):
    from harness.cli import run as run_module

    monkeypatch.setattr(run_module, "baseline_for", lambda env: None)  # where run looks it up
    opts = run_module.RunOptions(baseline=Path("auto"),
                                 checks=[parse_check("bench_s:+50%"), parse_check("x:<=1")])
    assert run_module._baseline(opts) is None
    assert [c.text for c in opts.checks] == ["x:<=1"]
    assert "no baseline for this machine class" in capsys.readouterr().err


def test_a_pooled_baseline_shows_the_noise_between_runs(repo, tmp_path):
    """Several runs of one commit, pooled: each timing's samples merged, so the baseline's
    spread includes the shift between runs; runs of different commits are refused."""
    from harness.report.gate import pool_runs

    slow, fast = timing([1.3, 1.31, 1.29, 1.3]), timing([1.0, 1.01, 0.99, 1.0])
    pooled = pool_runs([fast, slow]).records[0].metrics["bench_s"]
    assert pooled.sample.n == 8 and pooled.spread > 0.25
    paths = []
    for i, run in enumerate((fast, slow)):
        paths.append(tmp_path / f"r{i}.json")
        write_results(run, paths[-1])
    target = repo / "fixtures" / "baselines" / "pooled.json"
    write_baseline(paths, target)
    assert load_results(target).records[0].metrics["bench_s"] == pooled
    other = dataclasses.replace(slow, environment=dataclasses.replace(ENV, git_commit="b" * 40))
    write_results(other, paths[1])
    with pytest.raises(GateError, match="one commit"):
        write_baseline(paths, repo / "fixtures" / "baselines" / "mixed.json")


def test_pooled_runs_must_share_a_machine_class(repo, tmp_path):
    a = timing([1.0, 1.0, 1.0, 1.0])
    gpu = dataclasses.replace(a, environment=dataclasses.replace(
        ENV, gpu_name="NVIDIA H200", gpu_count=1))
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    write_results(a, paths[0])
    write_results(gpu, paths[1])
    with pytest.raises(GateError, match="one machine class"):
        write_baseline(paths, repo / "fixtures" / "baselines" / "mixed.json")


def test_pytest_refuses_a_relative_check_without_a_baseline(tmp_path):
    """Refused before any test runs, not as an internal error at the end of the session."""
    done = run_pytest(tmp_path, 1.0, "--llava-fail", "wall_s:+5%")
    assert done.returncode == 4 and "needs --llava-baseline" in done.stderr, done.stderr
