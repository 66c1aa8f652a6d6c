"""Reports: report.md says per suite what passed, failed and was skipped (with reasons), then
metric tables with units; results.csv has one row per metric; `compare` puts runs side by side
with ratios against the first, handles mismatched case sets, and draws a PNG; the pytest
plugin collects outcomes, recorded metrics and pytest-benchmark statistics into results.json
only when asked to."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from harness.cli.app import main
from harness.report.compare import render_comparison
from harness.report.compare_folder import write_comparison
from harness.report.single import render_report, write_report
from harness.report.compare import CompareError
from harness.report.environment import Environment
from harness.report.results import Metric, Record, Results, load_results, write_results
from harness.report.single import WIDE_METRICS, csv_text

CPU = Environment(hostname="ci", cpu_model="Test CPU", cpu_count=2, python="3.11.7",
                  libraries={"torch": "2.13.0"}, git_commit="a" * 40, git_dirty=False)
GPU = dataclasses.replace(CPU, gpu_name="NVIDIA H100 80GB HBM3", gpu_count=1,
                          gpu_memory_mib=81559, gpu_driver="550.54", cuda_version="12.8")


def squash(text: str) -> str:
    """Table cells padded to column width -> single spaces, so asserts read like the rows."""
    return re.sub(r" +", " ", text)


def rec(suite, case, outcome="passed", reason=None, **metrics):
    return Record(suite, case, outcome, reason,
                  {name: Metric(*spec) for name, spec in metrics.items()}, "t")


def run_of(*records, env=CPU, run_id="run-a"):
    return Results(run_id, env, tuple(records), "2025-01-01T00:00:00+00:00",
                   suite_descriptions={"extraction": "Projector extraction, bit for bit."},
                   settings={"checkpoint": "synthetic (tiny preset)"})


RUN = run_of(
    rec("extraction", "bin-last", extract_wall_s=(0.125, "s", "lower"),
        peak_rss=(301.5, "MiB", "lower")),
    rec("extraction", "st-split", extract_wall_s=(0.25, "s", "lower")),
    rec("extraction", "broken|pipe", "failed", "AssertionError: 3 != 4 | in shard 2"),
    rec("quant", "nf4", "skipped", "needs a CUDA GPU (torch.cuda.is_available() is False)"),
    rec("quant", "int8", "skipped", "needs a CUDA GPU (torch.cuda.is_available() is False)"),
    rec("counts", "7b", params=(20_979_712, "params", "none")))


def test_report_summarizes_each_suite_with_reasons_and_metrics():
    text = squash(render_report(RUN))
    assert text.startswith("# llava-harness report: run run-a")
    assert "**FAILED**: 6 cases, 3 passed, 1 failed, 2 skipped." in text
    assert "| extraction | 2 | 1 | 0 | 0 |" in text and "| quant | 0 | 0 | 2 | 0 |" in text
    assert "- **extraction**: Projector extraction, bit for bit." in text
    assert "| checkpoint | synthetic (tiny preset) |" in text
    # A skip reason once per suite with its count; a failure with its reason, pipes escaped.
    assert text.count("needs a CUDA GPU") == 1
    assert "| quant | needs a CUDA GPU (torch.cuda.is_available() is False) | 2 | nf4 |" in text
    assert "| extraction | broken\\|pipe | failed | AssertionError: 3 != 4 \\| in shard 2 |" \
        in text
    assert "| case | extract_wall_s (s, ↓) | peak_rss (MiB, ↓) |" in text
    assert "| bin-last | 0.125 | 301.5 |" in text and "| st-split | 0.25 | |" in text
    assert "| 7b | 20,979,712 |" in text
    assert "<details><summary>quant: 2 cases</summary>" in text
    assert "on Test CPU (2 cores); harness commit aaaaaaaaaaaa." in text


def test_report_goes_long_when_a_suite_has_many_metrics():
    many = {f"m{i}": (float(i), "s", "lower") for i in range(WIDE_METRICS + 1)}
    text = squash(render_report(run_of(rec("s", "c", **many))))
    assert "| case | metric | value | unit | better |" in text
    assert text.count("| c | m") == WIDE_METRICS + 1


def test_csv_has_one_row_per_metric_and_round_trips_values():
    rows = list(csv.DictReader(io.StringIO(csv_text(RUN))))
    assert len(rows) == 3 + 1 + 1 + 2  # metrics, plus one row for each case without any
    first = rows[0]
    assert (first["suite"], first["case"], first["metric"], first["unit"]) == \
           ("extraction", "bin-last", "extract_wall_s", "s")
    assert float(first["value"]) == 0.125
    assert next(r for r in rows if r["metric"] == "params")["value"] == "20979712"
    assert next(r for r in rows if r["case"] == "nf4")["reason"].startswith("needs a CUDA")


def test_write_report_writes_three_files(tmp_path):
    paths = write_report(RUN, tmp_path / "run-a")
    assert sorted(p.name for p in (tmp_path / "run-a").iterdir()) == \
           ["report.md", "results.csv", "results.json"]
    assert load_results(paths["json"]) == RUN


# --- compare ---------------------------------------------------------------------------------

A = run_of(rec("extraction", "bin-last", extract_wall_s=(0.2, "s", "lower")),
           rec("extraction", "only-a", extract_wall_s=(1.0, "s", "lower")),
           rec("quant", "nf4", "skipped", "needs a CUDA GPU"))
B = run_of(rec("extraction", "bin-last", extract_wall_s=(0.1, "s", "lower")),
           rec("quant", "nf4", decode_tokens_per_s=(24.0, "tokens/s", "higher")),
           rec("quant", "only-b", decode_tokens_per_s=(30.0, "tokens/s", "higher")),
           env=GPU, run_id="run-b")


def test_compare_labels_runs_and_judges_each_metric_against_the_first():
    text = squash(render_comparison([A, B], ["cpu.json", "gpu.json"]))
    assert "- A: run-a (Test CPU (2 cores))" in text and "- B: run-b (NVIDIA H100 80GB HBM3)" in text
    assert "| A | run-a | Test CPU (2 cores) | aaaaaaaaaa | 3 | cpu.json |" in text
    assert "- B differs from A in: gpu_name: NVIDIA H100 80GB HBM3 != None;" in text
    assert "| case | metric | A | B | B vs A |" in text
    # Measured once: no noise known, so the verdict says so; half the time is better.
    assert "| bin-last | extract_wall_s (s, ↓) | 0.2 | 0.1 | 0.5x, better, measured once |" \
        in text


def test_compare_handles_mismatched_case_sets():
    text = squash(render_comparison([A, B]))
    assert "The case sets differ: 2 cases are in every run" in text
    assert "- A lacks 1: `quant::only-b`" in text
    assert "- B lacks 1: `extraction::only-a`" in text
    # Missing values show as a dash and get no verdict; outcomes that differ are listed.
    assert "| only-a | extract_wall_s (s, ↓) | 1 | — | — |" in text
    assert "| only-b | decode_tokens_per_s (tokens/s, ↑) | — | 30 | — |" in text
    assert "| quant::nf4 | skipped | passed |" in text


def test_outcome_changes_come_first_and_cases_failed_everywhere_are_named():
    failing = rec("extraction", "broken", "failed", "planted")
    a = run_of(rec("extraction", "flips"), failing)
    b = run_of(rec("extraction", "flips", "failed", "regressed"), failing, run_id="run-b")
    text = squash(render_comparison([a, b]))
    assert text.index("## Outcome changes") < text.index("## Runs") < text.index("## Metrics")
    assert "1 case(s) have different outcomes" in text
    assert "| extraction::flips | passed | failed |" in text
    assert "**1 case(s) failed in every run**: `extraction::broken`." in text


def test_a_timing_within_its_noise_is_the_same_and_a_2x_one_is_not():
    def run(values, run_id):
        record = Record("figures", "extract", "passed", None,
                        {"bench_s": Metric.of(values, "s")}, "t")
        return Results(run_id, CPU, (record,), "t")

    base = run([1.0, 1.02, 0.98, 1.01, 0.99], "a")
    text = squash(render_comparison([base, run([1.1, 1.12, 1.08, 1.11, 1.09], "b"),
                                     run([2.0, 2.04, 1.96, 2.02, 1.98], "c")]))
    row = next(line for line in text.splitlines() if line.startswith("| extract |"))
    assert "1 ±0.01 (n=5)" in row and "same, within noise" in row
    assert "2x, worse" in row and "measured once" not in row


def test_compare_of_identical_case_sets_says_so():
    text = render_comparison([A, dataclasses.replace(A, run_id="again")])
    assert "All 2 runs have the same 3 cases." in text and "| same" in text


def test_compare_writes_markdown_and_a_png_chart(tmp_path):
    paths = write_comparison([A, B, A], tmp_path / "cmp")
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![figures per family, with error bars](compare.png)" in \
        paths["markdown"].read_text()


def test_the_chart_groups_figures_by_family():
    from harness.report.chart import family

    assert family("load_s", "s") == "load (s)"
    assert family("prefill_s", "s") == "prefill (s)"
    assert family("decode_tokens_per_s", "tokens/s") == "decode (tokens/s)"
    assert family("peak_rss", "MiB") == "peak memory (MiB)"
    assert family("footprint_over_theory", "ratio") == "footprint vs theory"
    assert family("extract_wall_s", "s") == family("bench_s", "s") == "operation wall time (s)"
    assert family("total_params", "params") is None


def test_compare_without_a_common_metric_draws_no_chart(tmp_path):
    only_b = run_of(rec("quant", "nf4", tps=(1.0, "tokens/s", "higher")))
    paths = write_comparison([run_of(rec("s", "c")), only_b], tmp_path / "cmp")
    assert paths["chart"] is None and paths["markdown"].is_file()


def test_compare_needs_two_runs_and_known_metrics():
    with pytest.raises(CompareError, match="at least two"):
        render_comparison([A])
    with pytest.raises(CompareError, match="'nope'"):
        write_comparison([A, B], "/nonexistent", metrics=["nope"])


# --- CLI ---------------------------------------------------------------------------------------

def test_cli_report_and_compare(tmp_path, capsys):
    write_results(A, tmp_path / "a.json")
    write_results(B, tmp_path / "b.json")
    assert main(["report", str(tmp_path / "a.json")]) == 0
    assert capsys.readouterr().out.startswith("# llava-harness report: run run-a")
    assert main(["report", str(tmp_path / "a.json"), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("run_id,suite,case")
    assert main(["report", str(tmp_path / "a.json"), "-o", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").is_file()
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                 "-o", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "0.5x, better" in out and f"chart: {tmp_path / 'c' / 'compare.png'}" in out


def test_cli_refuses_another_schema_in_one_line(tmp_path, capsys):
    data = json.loads(A.to_json())
    data["schema_version"] = 0
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert main(["report", str(tmp_path / "old.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "old.json: results schema version 0" in err


# --- the plugin's collection -------------------------------------------------------------------

PLUGIN_TESTS = textwrap.dedent('''
    """Plugin collection check."""
    import pytest

    def test_records(llava_record):
        llava_record("wall_s", 0.5, "s")
        llava_record.update({"params": (123, "params"), "tps": (9.5, "tokens/s")})

    def test_fails():
        assert 1 == 2, "planted"

    @pytest.mark.skip(reason="needs a folder with a LoRA adapter")
    def test_skipped():
        pass

    @pytest.fixture
    def broken():
        raise RuntimeError("setup broke")

    def test_setup_error(broken):
        pass

    @pytest.mark.parametrize("n", [1, 2], ids=["one", "two"])
    def test_bench(benchmark, n):
        benchmark(sum, range(n))
''')


def run_plugin(tmp_path, *args):
    (tmp_path / "test_plugin_demo.py").write_text(PLUGIN_TESTS)
    # A serial run of its own, even when this suite runs under xdist: a worker's variables
    # would make pytest-benchmark in the child think it is a worker too and switch off.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path / "test_plugin_demo.py"), "--rootdir", str(tmp_path),
                           "--benchmark-min-rounds=2", "--benchmark-max-time=0.01", *args],
                          check=False, capture_output=True, text=True, cwd=tmp_path, env=env)


def test_plugin_collects_outcomes_metrics_and_benchmarks(tmp_path):
    done = run_plugin(tmp_path, "--llava-report-dir", str(tmp_path / "reports"),
                      "--llava-run-id", "demo")
    assert done.returncode == 1, done.stdout + done.stderr  # test_fails fails
    assert f"llava-harness report: {tmp_path / 'reports' / 'demo' / 'report.md'}" in done.stdout
    results = load_results(tmp_path / "reports" / "demo" / "results.json")
    by_case = {r.case: r for r in results.records}
    assert results.suite_descriptions == {"plugin_demo": "Plugin collection check."}
    assert {r.suite for r in results.records} == {"plugin_demo"}
    assert by_case["test_records"].metrics == {
        "wall_s": Metric(0.5, "s", "lower"), "params": Metric(123, "params", "none"),
        "tps": Metric(9.5, "tokens/s", "higher")}
    assert (by_case["test_fails"].outcome, by_case["test_fails"].reason) == \
           ("failed", "AssertionError: planted")
    assert (by_case["test_skipped"].outcome, by_case["test_skipped"].reason) == \
           ("skipped", "needs a folder with a LoRA adapter")
    assert by_case["test_setup_error"].outcome == "error"
    assert by_case["test_setup_error"].reason == "setup: RuntimeError: setup broke"
    # pytest-benchmark's rounds, every one of them, as the metric's sample.
    bench = by_case["test_bench[two]"].metrics["bench_s"]
    assert bench.unit == "s" and bench.direction == "lower" and bench.sample.n >= 2
    assert bench.value == bench.sample.median and bench.sample.min <= bench.sample.max


def test_plugin_writes_nothing_by_default(tmp_path):
    done = run_plugin(tmp_path)
    assert done.returncode == 1 and "llava-harness report" not in done.stdout
    # (.benchmarks is pytest-benchmark's own storage folder, __pycache__ Python's: not ours)
    assert {p.name for p in tmp_path.iterdir()} - {".benchmarks", "__pycache__"} == \
        {"test_plugin_demo.py"}


def _gathered(results: Results) -> list:
    """What a run's records say, without when they were made."""
    return sorted((r.suite, r.case, r.outcome, r.reason, r.metrics) for r in results.records)


def test_an_xdist_run_gathers_what_a_serial_run_does(tmp_path):
    """Under pytest-xdist, workers run the tests and the controller gathers their reports:
    the same records (outcomes, reasons, metrics), suite descriptions and gate verdict as a
    serial run. pytest-benchmark disables itself under xdist (parallel timings are no
    figures), so its test contributes an outcome and no statistics in both runs here."""
    runs = {}
    for name, extra in (("serial", []), ("xdist", ["-n", "2"])):
        done = run_plugin(tmp_path, "--llava-report-dir", str(tmp_path / "reports"),
                          "--llava-run-id", name, "--benchmark-disable",
                          "--llava-fail", "wall_s:<=1", *extra)
        assert done.returncode == 1, done.stdout + done.stderr  # test_fails fails
        assert "all 1 check(s) passed" in done.stdout, done.stdout
        runs[name] = load_results(tmp_path / "reports" / name / "results.json")
    serial, xdist = runs["serial"], runs["xdist"]
    assert len(serial.records) == 6 and _gathered(xdist) == _gathered(serial)
    assert xdist.suite_descriptions == serial.suite_descriptions
    # The check fails the same way in both.
    for name, extra in (("serial", []), ("xdist", ["-n", "2"])):
        done = run_plugin(tmp_path, "--benchmark-disable", "--llava-fail", "wall_s:<=0.1",
                          *extra)
        assert "FAIL plugin_demo::test_records wall_s" in done.stdout, done.stdout


def test_the_chart_never_puts_two_kinds_of_unit_on_one_axis(tmp_path):
    """Bytes and MiB share the peak-memory panel (drawn in MiB); a ratio gets its own."""
    from harness.report.chart import _entries

    def quant(run_id, scale):
        record = rec("quant", "nf4", load_peak_bytes=(scale * 2**30, "B", "lower"),
                     cuda_peak_allocated=(scale * 900.0, "MiB", "lower"),
                     footprint=(scale * 2**29, "B", "lower"),
                     footprint_ratio=(1.0, "ratio", "lower"))
        return run_of(record, run_id=run_id)

    runs = [quant("a", 1.0), quant("b", 1.1)]
    panels = _entries(runs, None)
    assert set(panels) == {"peak memory (MiB)", "footprint vs theory, MiB",
                           "footprint vs theory, ratio"}
    assert {e[2] for e in panels["peak memory (MiB)"]} == {"load_peak_bytes",
                                                           "cuda_peak_allocated"}
    paths = write_comparison(runs, tmp_path / "cmp")
    assert paths["chart"].read_bytes()[:4] == b"\x89PNG"


def test_compare_holds_a_difference_to_the_rank_test_and_names_it():
    """Both runs carry samples of 5+ values: a median beyond the noise allowance from samples
    that overlap is "no change detected" (Mann-Whitney U, with its figures); a shift the
    samples agree on is worse, with the test's figures. The two sides of one `ab` run are
    paired round by round: the signed-rank test, and no run-to-run floor."""
    from harness.report.compare import ab_pair, verdict

    base = Metric.of([1.00, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97], "s")
    overlapping = Metric.of([0.97, 0.99, 1.01, 1.40, 1.41, 1.45, 1.50], "s")
    shifted = Metric.of([1.38, 1.40, 1.42, 1.41, 1.39, 1.43, 1.37], "s")
    said = verdict(overlapping, base)
    assert said.startswith("no change detected") and "Mann-Whitney U" in said, said
    said = verdict(shifted, base)
    assert said.startswith("1.4x, worse") and "p=0.00058" in said, said
    # Paired: 8% slower in every round is far inside the 30% floor, and still a change.
    a = [1.0, 1.3, 0.9, 1.1, 1.2, 0.95, 1.05, 1.15]
    b = [v * (1.08 + i / 1000) for i, v in enumerate(a)]
    said = verdict(Metric.of(b, "s"), Metric.of(a, "s"), paired=True)
    assert said.startswith("1.08x, worse") and "Wilcoxon signed-rank" in said, said
    assert verdict(Metric.of(b, "s"), Metric.of(a, "s")).startswith("same, within noise")
    sides = [Results(f"ab-1-{s}", CPU, (), "t", settings={"ab_side": s.upper()})
             for s in "ab"]
    assert ab_pair(*sides) and not ab_pair(sides[1], sides[0])
