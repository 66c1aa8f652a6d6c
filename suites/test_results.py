"""The results schema: JSON -> object -> JSON is identical for any run (hypothesis), integers
stay exact, non-finite floats survive as strict JSON, a file of another schema version or a
malformed field is one clear line naming the file and the field, and the environment
fingerprint names the hardware and the library versions without importing torch."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.report.environment import (
    Environment,
    collect,
    isa_level,
    numeric_fingerprint,
)
from harness.report.results import (
    DIRECTIONS,
    OUTCOMES,
    Metric,
    Record,
    Results,
    ResultsError,
    check_run_id,
    load_results,
    make_record,
    save_records,
)

# A name, a unit, a timestamp or an environment field is one line of printable text (the reader
# refuses control and format characters: suites/test_hostile_results.py); free text (a reason, a
# setting, a description) is any text.
one_line = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Cf", "Zl", "Zp"))
names = st.text(one_line, min_size=1, max_size=12)
optional_text = st.none() | st.text(one_line, max_size=20)
values = (st.integers(min_value=-2**70, max_value=2**70)
          | st.floats(allow_nan=True, allow_infinity=True))
metrics = st.builds(Metric, values, st.text(one_line, max_size=8), st.sampled_from(DIRECTIONS))
environments = st.builds(
    Environment, hostname=optional_text, os=optional_text, python=optional_text,
    cpu_vendor=optional_text, cpu_model=optional_text, cpu_family=optional_text,
    cpu_isa=optional_text, cpu_count=st.none() | st.integers(1, 512),
    torch_cpu_capability=optional_text, torch_blas=optional_text, torch_onednn=optional_text,
    torch_threads=st.none() | st.integers(1, 512), cuda_capability=optional_text,
    cudnn_version=optional_text, tf32=st.none() | st.booleans(),
    memory_mib=st.none() | st.integers(0, 2**40), gpu_name=optional_text,
    gpu_count=st.integers(0, 16), gpu_memory_mib=st.none() | st.integers(0, 2**20),
    gpu_driver=optional_text, cuda_version=optional_text,
    libraries=st.dictionaries(names, st.none() | st.text(one_line, max_size=10), max_size=4),
    git_commit=optional_text, git_dirty=st.none() | st.booleans())
records = st.builds(Record, suite=names, case=names, outcome=st.sampled_from(OUTCOMES),
                    reason=st.none() | st.text(max_size=20),
                    metrics=st.dictionaries(names, metrics, max_size=4),
                    timestamp=st.text(one_line, max_size=30),
                    environment=st.none() | environments,
                    run_id=st.none() | st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True))
runs = st.builds(Results, run_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}",
                                               fullmatch=True),
                 environment=environments,
                 records=st.lists(records, max_size=6, unique_by=lambda r: r.key).map(tuple),
                 created=st.text(one_line, max_size=30),
                 suite_descriptions=st.dictionaries(names, st.text(max_size=30), max_size=3),
                 settings=st.dictionaries(names, st.text(max_size=30), max_size=3))


@given(runs)
def test_json_round_trip_is_lossless(run):
    text = run.to_json()
    back = Results.from_json(text)
    assert back == run
    assert back.to_json() == text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_round_trip_survives_the_file(tmp_path):
    recs = [make_record("extraction", "bin-last", {"extract_wall_s": (0.12, "s"),
                                                   "params": (6_738_415_616, "params"),
                                                   "tps": (math.inf, "tokens/s")}),
            make_record("quant", "nf4", outcome="skipped", reason="needs a CUDA GPU")]
    saved = save_records(recs, tmp_path / "r" / "results.json", run_id="run-1")
    loaded = load_results(tmp_path / "r" / "results.json")
    assert loaded == saved and loaded.run_id == "run-1"
    assert loaded.records[0].metrics["params"].value == 6_738_415_616
    assert isinstance(loaded.records[0].metrics["params"].value, int)
    assert loaded.records[0].metrics["tps"].value == math.inf
    assert (tmp_path / "r" / "results.json").read_text() == loaded.to_json()


def test_make_record_fills_time_environment_and_directions():
    rec = make_record("s", "c", {"t": (1.0, "s"), "m": (2.0, "MiB"), "tps": (3.0, "tokens/s"),
                                 "n": (4, "params"), "r": (0.5, "ratio", "lower")})
    assert rec.timestamp and rec.environment is not None
    assert rec.environment.libraries["torch"]
    assert {k: m.direction for k, m in rec.metrics.items()} == {
        "t": "lower", "m": "lower", "tps": "higher", "n": "none", "r": "lower"}


@pytest.mark.parametrize("metrics, words", [
    ({"t": 1.0}, ["'t'", "(value, unit)"]),
    ({"t": ("fast", "s")}, ["'t'", "'fast'", "number"]),
    ({"t": (True, "s")}, ["'t'", "number"]),
    ({"t": (1.0, "s", "smaller")}, ["'t'", "'smaller'", "lower, higher, none"]),
], ids=["bare-value", "text-value", "bool-value", "bad-direction"])
def test_bad_metrics_are_named(metrics, words):
    with pytest.raises(ResultsError) as info:
        make_record("s", "c", metrics)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_bad_outcome_and_duplicate_cases_are_refused():
    with pytest.raises(ResultsError, match="outcome 'crashed'"):
        make_record("s", "c", outcome="crashed")
    with pytest.raises(ResultsError, match="two records for s::c"):
        save_records([make_record("s", "c"), make_record("s", "c")], "/nonexistent/x.json")


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "results.json"
    save_records([make_record("s", "c", {"t": (1.0, "s")})], path)
    return path


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.update(schema_version=2), ["schema version 2", "reads version 1"]),
    (lambda d: d.pop("schema"), ["not a llava-harness results file"]),
    (lambda d: d.update(extra=1), ["unknown top-level field 'extra'"]),
    (lambda d: d.update(run_id=""), ["run_id"]),
    (lambda d: d["records"][0]["metrics"]["t"].update(value="1.0"),
     ["records[0].metrics['t'].value", "'1.0'"]),
    (lambda d: d["records"][0]["metrics"]["t"].pop("unit"),
     ["records[0].metrics['t']", "value, unit, direction"]),
    (lambda d: d["records"][0]["metrics"]["t"].update(sample=[1.0, "x"]),
     ["records[0].metrics['t'].sample", "'x'", "finite number"]),
    (lambda d: d["records"][0]["metrics"]["t"].update(sample=[0.5] * 100_001),
     ["records[0].metrics['t'].sample", "1 to 100,000"]),
    (lambda d: d["records"][0]["metrics"]["t"].update(sample=[9.0, 9.0]),
     ["records[0].metrics['t']", "value is its median"]),
    (lambda d: d["records"][0].update(outcome="ok"), ["records[0]", "outcome 'ok'"]),
    (lambda d: d["records"][0].update(colour="red"), ["records[0]", "unknown field 'colour'"]),
    (lambda d: d["environment"].update(gpu="x"), ["environment", "unknown field 'gpu'"]),
    (lambda d: d.update(records={}), ["records must be a list"]),
], ids=["other-version", "no-schema", "unknown-field", "empty-run-id", "value-as-text",
        "no-unit", "sample-not-numbers", "sample-too-long", "value-not-the-median", "bad-outcome", "unknown-record-field", "unknown-environment-field",
        "records-not-a-list"])
def test_malformed_files_name_the_file_and_field(saved, edit, words):
    data = json.loads(saved.read_text())
    edit(data)
    saved.write_text(json.dumps(data))
    with pytest.raises(ResultsError) as info:
        load_results(saved)
    message = str(info.value)
    assert message.startswith(str(saved)) and "\n" not in message
    assert all(w in message for w in words), message


def test_unreadable_files_are_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ResultsError, match="bad.json: not valid JSON"):
        load_results(tmp_path / "bad.json")
    with pytest.raises(ResultsError, match="absent.json: cannot read"):
        load_results(tmp_path / "absent.json")


@pytest.mark.parametrize("text", ["", "a/b", "../x", ".hidden", "a b", "x" * 101])
def test_run_ids_name_a_folder(text):
    with pytest.raises(ResultsError, match="run id"):
        check_run_id(text)


def test_environment_fingerprint_names_hardware_libraries_and_commit():
    env = collect()
    assert env.cpu_count and env.cpu_model and env.python and env.os
    assert {"torch", "transformers", "peft", "bitsandbytes", "safetensors"} <= set(env.libraries)
    assert env.libraries["torch"]
    # An editable install in a git checkout knows its commit; the dirty flag is a bool then.
    import harness

    checkout = Path(harness.__file__).resolve().parent.parent  # the harness under test
    if (checkout / ".git").exists():
        assert env.git_commit is not None, "a checkout's harness must know its commit"
    if env.git_commit is not None:
        assert len(env.git_commit) == 40 and isinstance(env.git_dirty, bool)
    from harness.report.nvml import gpus

    if not gpus()[0]:
        assert env.gpu_count == 0 and env.gpu_name is None
    assert Environment.from_dict(env.to_dict()) == env


def test_fingerprint_names_what_moves_the_last_bits():
    """CPU vendor, family and ISA level, and torch's dispatch level, BLAS, oneDNN and threads:
    what decides whether two machines compute the same bits (CUDA facts where there is one)."""
    import torch

    env = collect()  # torch is imported here, so its facts are read
    assert env.cpu_vendor and env.cpu_family and env.cpu_isa in {
        "amx", "avx512_bf16", "avx512", "avx2", "baseline"}
    assert env.torch_cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert env.torch_threads == torch.get_num_threads()
    assert env.torch_blas and env.torch_onednn
    if not torch.cuda.is_available():
        assert env.cuda_capability is None and env.tf32 is None
    fingerprint = numeric_fingerprint()
    assert fingerprint["torch"] == env.libraries["torch"]
    assert fingerprint["cpu_isa"] == env.cpu_isa


@pytest.mark.parametrize("flags, level", [
    ({"sse2"}, "baseline"), ({"avx2", "fma"}, "avx2"), ({"avx2", "avx512f"}, "avx512"),
    ({"avx512f", "avx512_bf16"}, "avx512_bf16"), ({"avx512f", "amx_tile"}, "amx")])
def test_isa_level_is_the_highest_the_cpu_reports(flags, level):
    assert isa_level(flags) == level


def test_fingerprint_does_not_import_torch():
    code = ("import sys; from harness.report.environment import collect; collect(); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"


def test_environment_differences_name_the_fields():
    a = Environment(cpu_model="X", libraries={"torch": "2.13.0"})
    b = dataclasses.replace(a, gpu_name="NVIDIA H100", gpu_count=1,
                            libraries={"torch": "2.13.0+cu128"})
    assert a.differences(b) == ["gpu_name: None != NVIDIA H100", "gpu_count: 0 != 1",
                                "torch: 2.13.0 != 2.13.0+cu128"]
    assert a.differences(a) == []


def test_a_repeated_measurement_round_trips_with_every_value():
    from harness.report.results import Metric, make_results

    record = make_record("figures", "extract", {"bench_s": ([0.3, 0.1, 0.2, 0.25, 0.15], "s")})
    metric = record.metrics["bench_s"]
    assert metric.value == 0.2 and metric.sample.n == 5 and metric.direction == "lower"
    assert (metric.sample.q1, metric.sample.q3, metric.sample.min, metric.sample.max) == \
        (0.15, 0.25, 0.1, 0.3)
    assert metric.sample.mad == pytest.approx(0.05) and metric.spread == pytest.approx(0.1)
    run = make_results([record], "r")
    text = run.to_json()
    again = Results.from_json(text)
    assert again == run and again.to_json() == text
    assert again.records[0].metrics["bench_s"].sample.values == (0.3, 0.1, 0.2, 0.25, 0.15)
    assert Metric.of([1, 2, 3], "s") != Metric.of([1, 2, 3, 2], "s")  # the sample counts


def test_a_test_id_no_results_file_can_hold_fails_only_the_report():
    """The plugin collects in every pytest session where the harness is installed; a foreign
    test id over the results file's 1,000-character bound is checked when a report is written,
    not while the session runs (checking it while collecting once made such a session end in
    INTERNALERROR)."""
    from harness.report.collector import Collector
    from harness.report.environment import current

    collector = Collector({})
    nodeid = "suites/test_x.py::test_a[" + "a" * 1200 + "]"
    collector.outcome(nodeid, "passed")
    collector.add_metric(nodeid, "x_s", Metric.of([0.5], "s", "lower"))
    collector.outcome(nodeid, "skipped", "why")
    with pytest.raises(ResultsError, match="more than 1,000"):
        collector.results("r1", current())
