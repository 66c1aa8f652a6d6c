"""The oracle machinery: its environment, its cache key, atomic results, and the choice of
oracle. (The comparison of the harness with the oracle is suites/test_original_llava.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.oracle import live, source, venv
from harness.oracle.cases import case_ids, checkpoints

FAKE_FINGERPRINT = {"torch": "2.13.0", "cpu_vendor": "X", "cpu_model": "X", "cpu_family": None,
                    "cpu_isa": "avx2", "torch_cpu_capability": "AVX2", "torch_blas": None,
                    "torch_onednn": None, "torch_threads": 2}


def _fake_env(folder: Path, script: str) -> venv.OracleEnv:
    """An oracle environment whose interpreter is `script`: ready as far as the harness can
    tell, without LLaVA."""
    (folder / "bin").mkdir(parents=True)
    python = folder / "bin" / "python"
    python.write_text(f"#!/bin/sh\n{script}\n")
    python.chmod(0o755)
    (folder / venv.READY).write_text(json.dumps({"key": "fake", "requirements": []}))
    return venv.OracleEnv(folder)


def test_the_environment_pins_llavas_release_and_this_torch():
    reqs = venv.requirements()
    assert reqs[0] == "llava-torch==1.2.2.post1"
    for pin in ("transformers==4.37.2", "tokenizers==0.15.1", "sentencepiece==0.1.99",
                "accelerate==0.21.0", "peft==0.10.0", "numpy==1.26.4"):
        assert pin in reqs
    import PIL
    import torch

    assert f"pillow=={PIL.__version__}" in reqs  # the pixels are made by the same pillow
    assert venv.torch_requirement() == f"torch=={torch.__version__.split('+')[0]}"
    assert not any(r.startswith("torch") for r in reqs)  # torch goes in first, with its deps


def test_the_environment_lives_in_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_HARNESS_CACHE", str(tmp_path))
    env = venv.default_env()
    assert env.folder.parent == tmp_path / "oracle"
    assert not env.is_ready()
    with pytest.raises(venv.OracleEnvError, match="llava-harness oracle setup"):
        venv.require_env(env)


def test_the_oracle_interpreter_sees_nothing_of_ours(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere/harness")
    env = venv.clean_env()
    assert "PYTHONPATH" not in env and "VIRTUAL_ENV" not in env
    assert env["HF_HUB_OFFLINE"] == "1" and env["PYTHONNOUSERSITE"] == "1"


def test_a_cached_result_is_keyed_by_the_machine_and_the_checkpoints(tmp_path):
    env = _fake_env(tmp_path / "env", "exit 1")
    hashes = {"a": {"f": "0"}}
    key = live.result_key(env, hashes, FAKE_FINGERPRINT)
    assert key == live.result_key(env, hashes, dict(FAKE_FINGERPRINT))
    other_cpu = {**FAKE_FINGERPRINT, "cpu_vendor": "Y"}
    fewer_threads = {**FAKE_FINGERPRINT, "torch_threads": 1}
    other_bytes = {"a": {"f": "1"}}
    assert len({key, live.result_key(env, hashes, other_cpu),
                live.result_key(env, hashes, fewer_threads),
                live.result_key(env, other_bytes, FAKE_FINGERPRINT)}) == 4


def test_a_failing_computation_leaves_nothing_behind(tmp_path):
    env = _fake_env(tmp_path / "env", "echo 'Traceback ...' >&2; echo 'ImportError: no llava' >&2; "
                                      "exit 1")
    folders = {entry["id"]: tmp_path / "missing" for entry in checkpoints()}
    (tmp_path / "missing").mkdir()
    out = tmp_path / "oracle"
    with pytest.raises(live.OracleComputeError) as err:
        live.compute(out, folders, env)
    assert str(err.value) == "oracle compute: LLaVA's code failed: ImportError: no llava"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env", "missing"]  # no .partial


def test_every_stored_copy_has_every_case_and_says_where_it_was_computed():
    names = source.stored_names()
    assert len(names) >= 2  # one per machine kind seen, so one is always foreign
    for name in names:
        copy = source.stored_copy(name)
        assert {c["id"] for c in copy.cases} == set(case_ids())
        assert copy.manifest["computed_on"]["cpu_vendor"]
        assert name in copy.describe()


def test_the_stored_copy_made_here_is_exact_and_the_others_are_bounded():
    copies = source.stored_copies()
    exact = [c for c in copies if c.exact]
    assert len(exact) <= 1
    chosen = source.stored()
    assert chosen.exact == bool(exact)
    for copy in copies:
        assert ("bit for bit" in copy.describe()) == copy.exact


def _pytest(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLAVA_HARNESS_CACHE": str(cache)}
    suites = Path(__file__).resolve().parent
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(suites / "test_original_llava.py"), "-k", "preprocessing",
                           *args], capture_output=True, text=True, env=env, timeout=300)


def test_without_its_environment_the_live_oracle_is_skipped_or_an_error(tmp_path):
    done = _pytest(["-rs"], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "live oracle: its environment is not set up" in done.stdout
    done = _pytest(["--llava-oracle", "live"], tmp_path)
    assert done.returncode == 1
    assert "--llava-oracle live: live oracle: its environment is not set up" in done.stdout
    done = _pytest(["--llava-oracle", "stored", "-rs"], tmp_path)
    assert done.returncode == 0 and "--llava-oracle stored" in done.stdout
