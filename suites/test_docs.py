"""The documentation cannot drift from the code: every `llava-harness ...` and `pytest ...`
command line shown in README.md, docs/ and the data folders' READMEs is parsed by the real
parsers (the harness's CLI; pytest's with every installed plugin, this one included), and every
relative link resolves to a file and, where it names one, a heading."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)\s*$")
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
INLINE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SEPARATORS = {"&&", "||", ";", "|"}
# A placeholder path in an example (`/data/llava-v1.5-7b`, `DIR`) is not drift: the parsers'
# own existence checks say so in these words.
MISSING_PATH = re.compile(r"not a folder|not a file|does not exist|no such file", re.IGNORECASE)


def doc_files() -> list[Path]:
    if not (ROOT / "README.md").is_file() or not (ROOT / "docs").is_dir():
        pytest.skip("an installed harness: the documentation stays in the checkout")
    found = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "fixtures").rglob("README.md")), ROOT / "reports" / "README.md"]
    return [p for p in found if p.is_file()]


@dataclass(frozen=True)
class Shown:
    file: Path
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}: {self.text}"


def _blocks(path: Path):
    """(line number, text) of each shell command in fenced blocks, continuations joined, and
    of each inline code span, spans broken over lines joined."""
    lines = path.read_text().splitlines()
    fence, pending, start = None, "", 0
    for number, line in enumerate(lines, 1):
        match = FENCE.match(line)
        if match:
            fence = None if fence is not None else match.group(1)
            continue
        if fence is None:
            continue
        if fence in SHELL_FENCES:
            if not pending:
                start = number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            yield start, pending + line
            pending = ""
    yield from _inline_spans(lines)


def _inline_spans(lines: list[str]):
    """(line number, text) of each inline code span outside fenced blocks, spans broken over
    lines joined."""
    prose = "\n".join("" if f else line for f, line in zip(_fenced(lines), lines))
    for match in INLINE.finditer(prose.replace("\n", " ")):
        yield prose.count("\n", 0, match.start()) + 1, match.group(1)


def _fenced(lines: list[str]) -> list[bool]:
    """For each line, whether it belongs to a fenced block (the fences included)."""
    out, inside = [], False
    for line in lines:
        fence = bool(FENCE.match(line))
        out.append(inside or fence)
        inside = inside != fence
    return out


def _commands(text: str) -> list[list[str]]:
    """The simple commands of one shell line: comments dropped, split at && || ; and |,
    leading VAR=value assignments removed."""
    try:
        lexer = shlex.shlex(text, posix=True, punctuation_chars="&|;")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words = list(lexer)
    except ValueError:
        return []
    out, current = [], []
    for word in words:
        if word in SEPARATORS:
            out.append(current)
            current = []
        else:
            current.append(word)
    out.append(current)
    return [_without_assignments(c) for c in out if c]


def _without_assignments(words: list[str]) -> list[str]:
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    return words


def classify(words: list[str]) -> tuple[str, list[str]] | None:
    """("harness" | "pytest", argv) for a command the tests parse, else None."""
    if words[:1] == ["llava-harness"] and len(words) > 1:  # not the bare name in prose
        return "harness", words[1:]
    if len(words) >= 3 and words[0].startswith("python") and words[1] == "-m":
        if words[2] in ("harness.cli", "harness"):
            return "harness", words[3:]
        if words[2] == "pytest":
            return "pytest", words[3:]
    if words[:1] == ["pytest"]:
        return "pytest", words[1:]
    return None


def shown_commands() -> list[tuple[Shown, str, list[str]]]:
    out = []
    for path in doc_files():
        for line, text in _blocks(path):
            for words in _commands(text):
                found = classify(words)
                if found is not None:
                    out.append((Shown(path, line, " ".join(words)), *found))
    return out


def _harness_error(argv: list[str]) -> str | None:
    import contextlib
    import io

    from harness.cli.app import make_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            make_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return err.getvalue().strip() or f"exit {exc.code}"
    return None


def _pytest_error(argv: list[str]) -> str | None:
    from _pytest.config import get_config

    config = get_config()
    config.pluginmanager.load_setuptools_entrypoints("pytest11")
    try:
        config._parser.parse(argv)
    except pytest.UsageError as exc:
        return str(exc).strip().splitlines()[-1]
    return None


def _placeholder_path(error: str) -> bool:
    return bool(MISSING_PATH.search(error))


def test_the_docs_show_command_lines():
    """The extraction itself finds what it must: a check that parses nothing proves nothing."""
    shown = shown_commands()
    kinds = {kind for _, kind, _ in shown}
    assert kinds == {"harness", "pytest"} and len(shown) > 40, len(shown)
    texts = {s.text for s, _, _ in shown}
    assert "llava-harness run" in texts
    assert "python -m pytest suites -q" in texts


def test_every_command_line_shown_parses():
    problems = []
    for shown, kind, argv in shown_commands():
        error = _harness_error(argv) if kind == "harness" else _pytest_error(argv)
        if error and not _placeholder_path(error):
            problems.append(f"{shown}\n    {error}")
    assert not problems, "command lines in the docs that the parsers refuse:\n" + \
        "\n".join(problems)


@pytest.mark.parametrize("line, kind", [
    ("llava-harness extract CKPT --save-to x.bin", "harness"),  # an option that does not exist
    ("llava-harness strip CKPT -o OUT --layout gguf", "harness"),  # a value it refuses
    ("python -m pytest suites --llava-relsize", "pytest"),     # a misspelt plugin option
])
def test_the_check_catches_a_drifted_line(line, kind):
    (words,) = _commands(line)
    found = classify(words)
    assert found is not None and found[0] == kind
    error = _harness_error(found[1]) if kind == "harness" else _pytest_error(found[1])
    assert error and not _placeholder_path(error)


def test_commands_are_split_as_a_shell_does():
    assert _commands("A=1 B=2 llava-harness count x --json | jq .params  # note") == [
        ["llava-harness", "count", "x", "--json"], ["jq", ".params"]]
    assert _commands("pip install -e . && HF_HUB_OFFLINE=1 python -m pytest suites -q") == [
        ["pip", "install", "-e", "."], ["python", "-m", "pytest", "suites", "-q"]]


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    lines = path.read_text().splitlines()
    out = set()
    for line, fenced in zip(lines, _fenced(lines)):
        match = re.match(r"^#{1,6} (.+)$", line)
        if match and not fenced:
            title = match.group(1).strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_every_relative_link_resolves():
    problems = []
    for path in doc_files():
        for target in LINK.findall(path.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                problems.append(f"{path.relative_to(ROOT)}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                problems.append(f"{path.relative_to(ROOT)}: {target}: no such heading")
    assert not problems, "\n".join(problems)


def test_the_readme_is_a_front_door():
    """Short enough to read in two minutes; the depth is in docs/, linked from it."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    linked = set(re.findall(r"\(docs/([\w-]+\.md)", readme))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert "README.md" in linked and linked <= pages
    index = (ROOT / "docs" / "README.md").read_text()
    assert {p for p in pages if p != "README.md"} <= set(re.findall(r"\(([\w-]+\.md)\)", index))


# --- Python shown in the docs imports only the public API (harness/__init__.py's __all__) ---

PYTHON_FENCES = {"python", "py", "pycon"}
DEEP_CALL = re.compile(r"\bharness(?:\.\w+){2,}\(")  # harness.synth.presets.build_spec(...)


def _python_blocks(path: Path):
    """(line number, code) of each fenced Python block, and of each inline span that is an
    import or a call through a module path."""
    lines = path.read_text().splitlines()
    fence, start, body = None, 0, []
    for number, line in enumerate(lines, 1):
        match = FENCE.match(line)
        if match and fence is None:
            fence, start, body = match.group(1), number + 1, []
        elif match:
            if fence in PYTHON_FENCES:
                yield start, "\n".join(body)
            fence = None
        elif fence is not None:
            body.append(line)
    for line, text in _inline_spans(lines):
        if re.match(r"(from|import)\s+harness\b", text) or DEEP_CALL.search(text):
            yield line, text


def private_uses(code: str) -> list[str]:
    """What `code` takes from the harness other than `from harness import <public names>`."""
    import ast

    import harness

    try:
        tree = ast.parse(code)
    except SyntaxError:
        return [f"not Python: {code.splitlines()[0]!r}"]
    found = [m.group(0)[:-1] for m in DEEP_CALL.finditer(code)]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "harness":
            if node.module != "harness":
                found.append(f"from {node.module} import ...")
            found += [f"harness.{a.name} (not in harness.__all__)" for a in node.names
                      if a.name not in harness.__all__]
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.startswith("harness.")]
    return found


def test_the_docs_import_only_the_public_api():
    shown, problems = 0, []
    for path in doc_files():
        for line, code in _python_blocks(path):
            shown += "harness" in code
            problems += [f"{path.relative_to(ROOT)}:{line}: {use}" for use in private_uses(code)]
    assert shown >= 3, "the scan found no Python that uses the harness"
    assert not problems, "the docs reach past harness.__all__:\n" + "\n".join(problems)


@pytest.mark.parametrize("code, caught", [
    ("from harness.ops.load import load_pretrained_model", True),
    ("import harness.synth.presets", True),
    ("from harness import build_spec, _HOMES", True),  # a name the API does not export
    ("spec = harness.synth.presets.build_spec('tiny')", True),
    ("from harness import build_spec, build\nimport harness", False),
])
def test_the_import_check_catches_a_private_path(code, caught):
    assert bool(private_uses(code)) is caught


def test_every_public_name_resolves_without_loading_torch_first():
    """Each exported name is where `_HOMES` says; `import harness` alone loads no heavy library
    (pytest imports it for the plugin in every run)."""
    import subprocess
    import sys

    import harness

    for name in harness.__all__:
        value = getattr(harness, name)
        assert getattr(value, "__module__", harness._HOMES[name]) == harness._HOMES[name], name
    assert "HarnessError" in dir(harness)
    with pytest.raises(AttributeError):
        harness.no_such_name  # noqa: B018
    code = ("import sys, harness; heavy = {'torch', 'transformers', 'peft', 'safetensors'}; "
            "sys.exit(sorted(heavy & set(sys.modules)) or 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_api_page_runs_and_names_every_export(tmp_path, monkeypatch):
    """docs/api.md's example runs as shown (in an empty folder), and its table names each
    exported name: the page a user reads is the API there is."""
    import harness

    page = ROOT / "docs" / "api.md"
    if not page.is_file():
        pytest.skip("an installed harness: the documentation stays in the checkout")
    (start, example), *_ = _python_blocks(page)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, f"{page}:{start}", "exec"), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "llama", "mm_projector.bin"]
    listed = set(re.findall(r"`(\w+)", page.read_text().split("| name |", 1)[1]))
    assert set(harness.__all__) <= listed, set(harness.__all__) - listed
