"""`llava-harness run`: suites picked by name (unknown names refused at argument time, missing
files skipped with a message), run through pytest on the tiny default or on a user's folder,
the report written and its path printed; a broken folder gives clear one-line errors and a
non-zero exit, and `--fail` gates the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli.app import main
from harness.cli.run import SUITES, RunError, parse_suite_names, suite_files
from harness.data import suites_dir
from harness.report.results import load_results
from harness.synth.builder import build
from harness.synth.presets import build_spec

INDEX = "pytorch_model.bin.index.json"


@pytest.fixture(scope="module")
def bare_folder(tmp_path_factory):
    """A tiny checkpoint with its tokenizer and tower (the folder rules hold a folder to have
    them), named as LLaVA's loader routes it."""
    folder = tmp_path_factory.mktemp("bare") / "llava-tiny"
    build(build_spec("tiny"), folder)
    return folder


def copy_of(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "llava-ckpt")


def test_suite_names():
    assert parse_suite_names("extraction, counts,extraction") == ("extraction", "counts")
    assert parse_suite_names("all") == tuple(SUITES)
    with pytest.raises(RunError, match="unknown suite 'extractoin'; known: specs, builder"):
        parse_suite_names("extractoin")


def test_every_default_suite_name_is_known():
    from harness.cli.run import CHECKPOINT_SUITES, DEFAULT_SUITES

    assert set(DEFAULT_SUITES) | set(CHECKPOINT_SUITES) <= set(SUITES)
    assert (suites_dir() / SUITES["checkpoint"]).is_file()


def test_unknown_suite_is_refused_at_argument_time(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--suites", "builder,nope"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "'nope'" in err and len(err.splitlines()) == 1


def test_missing_suite_files_are_skipped_with_a_message(tmp_path):
    (tmp_path / SUITES["checkpoint"]).write_text("")
    files, skipped = suite_files(("checkpoint", "lora"), tmp_path)
    assert files == [tmp_path / SUITES["checkpoint"]]
    assert skipped == [f"suite lora: {tmp_path / SUITES['lora']} does not exist (yet); skipped"]


def test_no_existing_suite_is_an_error(tmp_path, capsys):
    assert main(["run", "--suites-dir", str(tmp_path), "--suites", "lora"]) == 2
    err = capsys.readouterr().err
    assert "suite lora:" in err and "none of the suites lora exists" in err


def test_missing_suites_folder_says_what_to_do(tmp_path, capsys):
    assert main(["run", "--suites-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--suites-dir" in err and "non-editable install" in err and "\n" not in err


def test_run_on_a_synthetic_folder_writes_a_report(bare_folder, tmp_path, capsys):
    code = main(["run", "--checkpoint", str(bare_folder), "-o", str(tmp_path),
                 "--run-id", "tiny", "--fail", "shards:==2"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    report = tmp_path / "tiny" / "report.md"
    assert f"report: {report}" in out and "gate: all 1 check(s) passed" in out
    assert sorted(p.name for p in report.parent.iterdir()) == \
           ["pytest.log", "report.md", "results.csv", "results.json"]
    results = load_results(tmp_path / "tiny" / "results.json")
    assert results.settings["checkpoint"] == str(bare_folder)
    assert {r.suite for r in results.records} == {"checkpoint", "rules"}
    # Rules for other kinds of folder (adapters, stage-1, plain) skip, saying why.
    assert [r.id for r in results.records if r.outcome not in ("passed", "skipped")] == []
    assert all(r.suite == "rules" for r in results.records if r.outcome == "skipped")
    text = report.read_text()
    assert "## Summary per suite" in text and "projector_params" in text


def test_arguments_after_a_double_dash_go_to_pytest(bare_folder, tmp_path, capsys):
    """`run -- --junitxml FILE`: a CI system gets pytest's own JUnit XML beside the report."""
    xml = tmp_path / "junit.xml"
    code = main(["run", "--checkpoint", str(bare_folder), "-o", str(tmp_path),
                 "--run-id", "junit", "-k", "index", "--", "--junitxml", str(xml)])
    assert code == 0, capsys.readouterr().out[-3000:]
    text = xml.read_text()
    assert "<testsuite" in text and "test_index_matches_the_files" in text


def test_workers_give_the_verdict_and_records_of_a_serial_run(bare_folder, tmp_path, capsys):
    """`run --workers 2` (pytest-xdist underneath): the same records, outcomes and metrics,
    the same gate verdict; `--json` prints that verdict alone on stdout."""
    seen = {}
    for run_id, extra in (("serial", []), ("two", ["--workers", "2"])):
        code = main(["run", "--checkpoint", str(bare_folder), "-o", str(tmp_path), "--run-id",
                     run_id, "--fail", "shards:==2", "--json", *extra])
        out = capsys.readouterr().out
        assert code == 0, out[-3000:]
        verdict = json.loads(out)
        assert verdict["exit"] == 0 and verdict["gate_failed"] is False
        results = load_results(tmp_path / run_id / "results.json")
        # Timings differ from run to run; their names and every other value may not.
        seen[run_id] = (verdict["counts"], sorted(
            (r.id, r.outcome, r.reason,
             sorted((n, m.unit, None if m.unit == "s" else m.value) for n, m in r.metrics.items()))
            for r in results.records))
    assert seen["two"] == seen["serial"] and seen["serial"][0]["passed"] >= 8
    assert "pytest-xdist" in load_results(tmp_path / "two" / "results.json").settings["workers"]


def plant(folder):
    """Three independent defects: the index's total_size, the config's projector type (the
    tensors are mlp2x_gelu) and its layer count (the tensors have 2 layers)."""
    index = json.loads((folder / INDEX).read_text())
    index["metadata"]["total_size"] = 1
    (folder / INDEX).write_text(json.dumps(index))
    config = json.loads((folder / "config.json").read_text())
    config.update(mm_projector_type="linear", num_hidden_layers=3)
    (folder / "config.json").write_text(json.dumps(config))


def test_run_on_a_broken_folder_names_each_fault(bare_folder, tmp_path, capsys):
    folder = copy_of(bare_folder, tmp_path)
    plant(folder)
    code = main(["run", "--checkpoint", str(folder), "-o", str(tmp_path / "r"),
                 "--fail", "shards:>=3"])
    out = capsys.readouterr().out
    assert code == 1
    failed = {line.split(":", 3)[2]: line for line in out.splitlines()
              if line.startswith("FAILED checkpoint::")}
    expected = {
        "test_index_matches_the_files": f"{folder / INDEX}: total_size 1 !=",
        "test_projector_type_agrees_with_the_config":
            "mm_projector_type 'linear', but the tensors are a mlp2x_gelu projector",
        "test_projector_shapes_match_a_module_built_from_the_config": "builds",
        "test_projector_count_formula_module_and_file_agree": "'mlp2x_gelu' projector",
        "test_language_model_shapes_match_transformers": "missing ['model.layers.2.",
    }
    for case, words in expected.items():
        assert case in failed and words in failed[case], (case, failed.get(case))
    # Extraction does not depend on the planted faults and still passes.
    results = load_results(next((tmp_path / "r").iterdir()) / "results.json")
    assert results.record("checkpoint", "test_extraction_copies_the_projector_bit_for_bit") \
        .outcome == "passed"
    assert "FAIL checkpoint::test_index_matches_the_files shards" not in out  # not recorded
    assert "FAIL shards:>=3: matches no metric in the results" in out


@pytest.mark.parametrize("make, words", [
    (lambda p: p.mkdir(), "no checkpoint found"),
    (lambda p: None, "not a folder"),
    (lambda p: (p.mkdir(), (p / INDEX).write_text("{not json")), "not readable JSON"),
], ids=["empty-folder", "absent", "index-not-json"])
def test_run_on_what_is_no_checkpoint_is_one_line(tmp_path, capsys, make, words):
    folder = tmp_path / "ckpt"
    make(folder)
    assert main(["run", "--checkpoint", str(folder), "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llava-harness: error: {folder}") and words in err
    assert err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_every_suite_file_has_a_name():
    """`--suites all` runs every suite, and records name their suite: no file is left out."""
    files = {p.name for p in Path(__file__).resolve().parent.glob("test_*.py")}
    assert files == set(SUITES.values()), sorted(files ^ set(SUITES.values()))
