"""The checks themselves must catch what they claim to: every planted defect is reported in
one line that names the file, and the CLI turns bad input into one line and exit code 2."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.checkpoint.reader import CheckpointError, consistency_problems, open_folder
from harness.cli.app import main
from harness.synth.builder import build
from harness.synth.presets import build_spec
from harness.synth.verify import verify

SHARD1, SHARD2 = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"
INDEX = "pytorch_model.bin.index.json"


def bare_spec(**checkpoint):
    return dataclasses.replace(build_spec("tiny", checkpoint=checkpoint or None),
                               with_tokenizer=False, with_vision_tower=False)


@pytest.fixture
def folder(tmp_path) -> Path:
    build(bare_spec(), tmp_path / "c")
    return tmp_path / "c"


def edit_index(folder: Path, fn) -> None:
    index = json.loads((folder / INDEX).read_text())
    fn(index)
    (folder / INDEX).write_text(json.dumps(index))


def test_clean_folder_has_no_problems(folder):
    assert consistency_problems(open_folder(folder)) == []
    assert verify(bare_spec(), folder) == []


def test_index_naming_a_missing_shard(folder):
    (folder / SHARD2).unlink()
    problems = consistency_problems(open_folder(folder))
    assert problems and SHARD2 in problems[0] and "does not exist" in problems[0]


def test_key_listed_but_absent_from_its_shard(folder):
    edit_index(folder, lambda i: i["weight_map"].update({"model.ghost.weight": SHARD1}))
    problems = consistency_problems(open_folder(folder))
    assert any("model.ghost.weight" in p and SHARD1 in p and "does not hold" in p
               for p in problems)


def test_stray_tensor_not_in_the_index(folder):
    edit_index(folder, lambda i: i["weight_map"].pop("lm_head.weight"))
    problems = consistency_problems(open_folder(folder))
    assert any("lm_head.weight" in p and "does not list" in p for p in problems)


def test_total_size_mismatch(folder):
    edit_index(folder, lambda i: i["metadata"].update({"total_size": 1}))
    problems = consistency_problems(open_folder(folder))
    assert problems == [f"{folder / INDEX}: total_size 1 != "
                        f"{sum(m.nbytes for m in open_folder(folder).tensors.values())}, "
                        "the sum of tensor bytes"]


@pytest.mark.parametrize("fmt, shard", [("bin", SHARD1),
                                        ("safetensors", "model-00001-of-00002.safetensors")])
def test_truncated_shard(tmp_path, fmt, shard):
    build(bare_spec(format=fmt), tmp_path / "c")
    path = tmp_path / "c" / shard
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        open_folder(tmp_path / "c").header(shard)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_pickle_that_is_not_plain_weights(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would run on load",))

    tmp_path.joinpath("c").mkdir()
    torch.save({"w": torch.zeros(2), "x": Payload()}, tmp_path / "c" / "pytorch_model.bin",
               pickle_module=pickle)
    with pytest.raises(CheckpointError, match="not plain weights"):
        open_folder(tmp_path / "c").header("pytorch_model.bin")


def test_verify_catches_a_flipped_byte(folder):
    shard = folder / SHARD2
    data = bytearray(shard.read_bytes())
    ckpt_meta = open_folder(folder).tensors["lm_head.weight"]
    assert ckpt_meta.file == SHARD2
    # Flip a byte deep inside the data records (past the pickle, before the directory).
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify(bare_spec(), folder)
    assert len(problems) == 1 and "differs from the bytes its seed and key generate" in problems[0]


def test_verify_catches_a_wrong_spec(folder):
    problems = verify(bare_spec(shards=3), folder)
    assert problems and all("the spec says" in p for p in problems)
    problems = verify(dataclasses.replace(
        bare_spec(), model=bare_spec().model.replace(dtype="bfloat16")), folder)
    assert any("float32" in p and "bfloat16" in p for p in problems)


# --- CLI -------------------------------------------------------------------------------------

def test_cli_plan_prints_the_published_index(capsys):
    assert main(["build", "--preset", "llava-v1.5-7b", "--plan"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["metadata"] == {"total_size": 13_518_798_848}
    assert len(plan["weight_map"]) == plan["tensor_count"] == 327
    assert plan["tensors"]["model.layers.0.self_attn.rotary_emb.inv_freq"] == \
        {"shape": [64], "dtype": "float32"}


@pytest.mark.parametrize("argv, words", [
    (["build", "--preset", "tiny", "--shards", "2", "--placement", "middle", "--plan"],
     ["middle", "3 shards"]),
    (["build", "--preset", "tiny", "--projector", "identity", "--plan"], ["identity"]),
    (["build", "--preset", "tiny"], ["--output"]),
])
def test_cli_bad_spec_is_one_line_and_exit_2(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("llava-harness: error:")
    for word in words:
        assert word in err


def test_cli_refuses_existing_output_without_touching_it(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("mine")
    assert main(["build", "--preset", "tiny", "-o", str(tmp_path / "out")]) == 2
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x"]


def test_cli_verify_unreadable_folder_exits_2(folder, capsys):
    (folder / SHARD1).write_bytes(b"not a zip")
    assert main(["verify", str(folder), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and SHARD1 in err and "not a readable torch" in err


def test_cli_verify_readable_but_different_exits_1(folder, capsys):
    assert main(["verify", str(folder), "--preset", "tiny", "--seed", "5"]) == 1
    assert "differs from the bytes its seed and key generate" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["build", "--shards", "0"], ["build", "--seed", "abc"],
                                  ["build", "--preset", "llava-v9"], ["build", "--format", "gguf"],
                                  ["verify"], ["frobnicate"]])
def test_cli_bad_option_is_one_line_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("llava-harness")


@pytest.mark.parametrize("mutate, words", [
    (lambda p: p.write_bytes((2**40).to_bytes(8, "little") + b"{}"), ["header length"]),
    (lambda p: p.write_bytes((2).to_bytes(8, "little") + b"[]"), ["list", "not an object"]),
    (lambda p: p.write_bytes((10).to_bytes(8, "little") + b'{"a": {}} '), ["a", "lacks"]),
])
def test_malformed_safetensors_header(tmp_path, mutate, words):
    (tmp_path / "c").mkdir()
    mutate(tmp_path / "c" / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        open_folder(tmp_path / "c").header("model.safetensors")
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("index, words", [
    ({"metadata": None, "weight_map": {"a": "../x.bin"}}, ["../x.bin", "not a file name"]),
    ({"weight_map": {"a": 3}}, ["3"]),
    ({"metadata": {"total_size": "big"}, "weight_map": {"a": "x.bin"}}, ["total_size", "big"]),
    ({"weight_map": {}}, ["no weight_map"]),
])
def test_malformed_index(tmp_path, index, words):
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        open_folder(tmp_path)
    assert str(tmp_path / INDEX) in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_measured_peak_is_the_childs_own():
    """The parent's high-water mark must not leak into the child's figure (rusage's does)."""
    from harness.bench.measure import run_measured

    ballast = bytearray(400 * 2**20)
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])  # touch every page
    child = run_measured([sys.executable, "-c", "b = bytearray(200 * 2**20); b[::4096] = "
                                                "b'y' * len(b[::4096]); import time; "
                                                "time.sleep(0.3)"])
    assert child.returncode == 0
    assert 200 * 2**20 <= child.peak_rss_bytes < 350 * 2**20
    del ballast


def test_a_launched_child_runs_this_harness_by_name(tmp_path, monkeypatch):
    """The launcher runs a harness function in a fresh process, measured, and the child imports
    the harness this process runs, even from a folder that holds another `harness`."""
    from harness.bench.floors import raw_copy
    from harness.bench.launcher import HARNESS_ROOT, child_env, launch

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(bytes(range(100)))
    decoy = tmp_path / "harness"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the decoy harness was imported')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert child_env()["PYTHONPATH"].split(os.pathsep)[0] == HARNESS_ROOT
    child = launch(raw_copy, str(tmp_path / "src"), {"a.bin": 150}, str(tmp_path / "out"))
    assert child.returncode == 0, child.stderr
    assert (tmp_path / "out" / "a.bin").read_bytes() == bytes(range(100)) + bytes(range(50))
    assert child.wall_s > 0 and child.peak_rss_bytes > 0


def test_a_child_past_its_timeout_is_killed_and_named():
    from harness.bench.launcher import launch
    from harness.bench.measure import BenchError, checked, run_measured

    child = run_measured([sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=0.5)
    assert child.returncode != 0 and child.wall_s < 30
    with pytest.raises(BenchError, match="sleeper: exit -9: timed out after 0.5 s: killed"):
        checked("sleeper", child)
    with pytest.raises(BenchError, match="module-level function of the harness"):
        launch(len, [1])


def test_console_script_build_and_verify(tmp_path):
    """The installed entry point, end to end, as a user runs it."""
    out = tmp_path / "st"
    script = shutil.which("llava-harness")
    assert script, "the llava-harness console script is not installed"
    cmd = [script]
    subprocess.run(cmd + ["build", "--preset", "tiny", "--format", "safetensors", "--shards",
                          "3", "--placement", "split", "-o", str(out)], check=True)
    done = subprocess.run(cmd + ["verify", str(out), "--preset", "tiny", "--format",
                                 "safetensors", "--shards", "3", "--placement", "split"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "matches the spec" in done.stdout
