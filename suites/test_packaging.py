"""The wheel is the product: what `pip install` gives carries the suites and their data inside
the package, and nothing outside it; the command line and the plugin behave the same there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from harness.data import fixtures_dir, suites_dir

PACKAGE = Path(__file__).resolve().parent.parent / "harness"


def _pyproject() -> dict | None:
    path = Path(__file__).resolve().parent.parent / "pyproject.toml"
    return tomllib.loads(path.read_text()) if path.is_file() else None


def test_the_data_and_suites_are_found_where_the_package_is():
    assert (fixtures_dir() / "tolerances.toml").is_file()
    assert (fixtures_dir() / "reference" / "original-llava").is_dir()
    assert (suites_dir() / "test_original_llava.py").is_file()
    assert (suites_dir() / "conftest.py").is_file() and (suites_dir() / "pytest.ini").is_file()


def test_every_subpackage_is_listed_for_the_wheel():
    project = _pyproject()
    if project is None:
        pytest.skip("an installed harness: pyproject.toml stays in the checkout")
    listed = set(project["tool"]["setuptools"]["packages"])
    found = {"harness"} | {"harness." + ".".join(p.parent.relative_to(PACKAGE).parts)
                           for p in PACKAGE.rglob("*/__init__.py") if "__pycache__" not in p.parts}
    assert found <= listed, f"not listed in pyproject.toml: {sorted(found - listed)}"


def test_the_wheel_carries_suites_and_data_inside_the_package(tmp_path):
    if _pyproject() is None:
        pytest.skip("an installed harness: the wheel is built from a checkout")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("llava_harness-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # Every module in the wheel is one of the tree's: a stale build/ folder (setuptools reuses
    # it) would ship modules that moved away, shadowing nothing and misleading everyone.
    sources = {"suites": root / "suites", "fixtures": root / "fixtures"}
    stale = [n for n in names if n.endswith(".py") and not
             (sources.get(n.split("/")[1], root / "harness")
              / "/".join(n.split("/")[2 if n.split("/")[1] in sources else 1:])).is_file()]
    assert not stale, f"modules not in the tree (rm -rf {root / 'build'}?): {stale[:5]}"
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"harness", next(t for t in tops if t.endswith(".dist-info"))}
    for needed in ("harness/fixtures/tolerances.toml", "harness/suites/conftest.py",
                   "harness/suites/pytest.ini", "harness/suites/test_original_llava.py",
                   "harness/fixtures/reference/llava-v1.5-7b.json"):
        assert needed in names, needed
    copies = {n.split("/")[4] for n in names
              if n.startswith("harness/fixtures/reference/original-llava/")
              and n.endswith("/manifest.json")}
    assert len(copies) >= 2
    for copy in copies:
        manifest = f"harness/fixtures/reference/original-llava/{copy}/manifest.json"
        assert any(n.startswith(f"harness/fixtures/reference/original-llava/{copy}/cases/")
                   for n in names), manifest


def test_the_command_line_says_its_version(capsys):
    from importlib import metadata

    from harness.cli.app import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"llava-harness {metadata.version('llava-harness')}"


SLOW_SUITE = '''
import pytest

@pytest.mark.slow
def test_takes_minutes():
    pass

def test_quick():
    pass
'''


@pytest.mark.parametrize("args, outcome", [
    ([], "1 passed, 1 skipped"), (["--llava-slow"], "2 passed"),
    (["-m", "not slow"], "1 passed, 1 deselected"), (["-m", "slow"], "1 skipped, 1 deselected")])
def test_one_slow_policy(tmp_path, args, outcome):
    """The plugin's slow policy, in any repository: slow tests run only with --llava-slow, and
    `-m "not slow"` deselects them (it does not select anything)."""
    (tmp_path / "test_s.py").write_text(SLOW_SUITE)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path / "test_s.py"), *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert outcome in done.stdout, done.stdout[-1500:]


def test_a_bare_source_tree_finds_its_data_beside_the_package():
    """`PYTHONPATH=checkout python -m harness.cli ...` (a bare GPU machine, no install): no
    package mapping exists, and the folders beside the package are used."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "harness" / "plugin.py").is_file():
        pytest.skip("an installed harness: there is no source tree beside it")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from harness.data import fixtures_dir, "
            "suites_dir; print(fixtures_dir()); print(suites_dir())")
    done = subprocess.run([sys.executable, "-S", "-c", code, str(root)], capture_output=True,
                          text=True, timeout=60)  # -S: no site-packages, no editable mapping
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(root / "fixtures"), str(root / "suites")]


FOREIGN_SUITE = '''
import os
import sys

def test_untouched_before():
    assert "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ

def test_offline_inside(llava_offline):
    import huggingface_hub.constants as constants
    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True

def test_untouched_after():
    import huggingface_hub.constants as constants
    assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE is False
'''


def _foreign_pytest(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """pytest in a repository of someone else's: its own folder, no harness settings, and an
    environment without the offline variables the harness's own runs carry."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTEST_ADDOPTS")}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, cwd=folder, env=env, timeout=300)


def test_the_plugin_leaves_the_process_as_it_found_it(tmp_path):
    """Installed, the plugin loads in every pytest session of the environment: it sets nothing
    process-wide; only its own fixtures go offline, for their scope."""
    (tmp_path / "test_foreign.py").write_text(FOREIGN_SUITE)
    # -p no:randomly-style reordering is not installed; the file order is the run order.
    done = _foreign_pytest(tmp_path, "-q", "test_foreign.py")
    assert done.returncode == 0 and "3 passed" in done.stdout, done.stdout[-2000:]


def test_llava_checkpoint_validates_a_folder_from_a_foreign_repository(tmp_path,
                                                                        tiny_checkpoint):
    """`pytest --llava-checkpoint DIR` in a repository with tests of its own (or none) runs
    the harness's checkpoint-folder suite on DIR, beside the repository's tests."""
    repo = tmp_path / "their-model"
    repo.mkdir()
    (repo / "test_theirs.py").write_text("def test_theirs():\n    pass\n")
    done = _foreign_pytest(repo, "-q", "-rA", "--llava-checkpoint", str(tiny_checkpoint))
    assert done.returncode == 0, done.stdout[-3000:]
    assert "PASSED test_theirs.py::test_theirs" in done.stdout
    validated = [line for line in done.stdout.splitlines()
                 if line.startswith("PASSED") and "test_theirs" not in line]
    assert "test_strip_gives_a_plain_language_model" in done.stdout
    assert len(validated) >= 8, done.stdout[-3000:]
    # Arguments naming a harness suite choose for themselves: nothing is added.
    specs = Path(__file__).resolve().parent / "test_specs_and_plan.py"
    done = _foreign_pytest(repo, "-q", "--collect-only", str(specs),
                           "--llava-checkpoint", str(tiny_checkpoint))
    assert "test_checkpoint_folder" not in done.stdout and done.returncode == 0, \
        done.stdout[-1500:]
    # Without the option, only their tests run: the plugin adds nothing on its own.
    done = _foreign_pytest(repo, "-q")
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-1500:]
    # A broken folder fails the validation, naming the file.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    index = broken / "pytorch_model.bin.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.mm_projector.0.weight"] = "pytorch_model-00009-of-00002.bin"
    index.write_text(json.dumps(data))
    done = _foreign_pytest(repo, "-q", "--llava-checkpoint", str(broken))
    assert done.returncode == 1 and "pytorch_model-00009-of-00002.bin" in done.stdout, \
        done.stdout[-3000:]


def _leaf_parsers(parser, path=()):
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(path), parser
    for action in subs:
        for name, child in action.choices.items():
            yield from _leaf_parsers(child, (*path, name))


def test_one_option_convention_across_every_command():
    """`-o/--output` for what a command writes, `--json` a flag meaning one JSON object on
    stdout: spelled the same in every command, and every option says what it does."""
    import argparse

    from harness.cli.app import make_parser

    leaves = dict(_leaf_parsers(make_parser()))
    assert {"build", "run", "extract", "strip", "bench quant", "oracle check"} <= set(leaves)
    for name, parser in leaves.items():
        options = {s: a for a in parser._actions for s in a.option_strings}
        assert not {"--out", "--report-dir", "--json-file"} & set(options), name
        if "-o" in options:
            assert options["-o"] is options["--output"] and options["-o"].help, name
        if "--json" in options:
            assert isinstance(options["--json"], argparse._StoreTrueAction), name
            assert "one JSON object on stdout" in options["--json"].help, name
        for action in parser._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.help is not None or action.choices, \
                    f"{name} {action.option_strings[0]}: no help text"
