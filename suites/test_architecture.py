"""The top of `harness/` reads as the architecture: a handful of folders, one concern each, and
every import points downward. A newcomer can trust the map in the README because this holds."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "harness"
if not (PACKAGE / "plugin.py").is_file():  # installed: the suites sit inside the package
    PACKAGE = Path(__file__).resolve().parent.parent

# Lowest first. A unit may import itself and anything on an earlier line, never a later one.
LAYERS = [
    {"errors", "data", "tolerances"},  # shared leaves: the error base, shipped data, tolerances
    {"checkpoint"},  # file formats and untrusted-input checks
    {"llava"},  # what a LLaVA checkpoint is: kinds, config schema, key rules, check rules
    {"console"},  # what the terminal shows: human lines, machine output, third-party warnings
    {"synth"},  # the builder
    {"model"},  # LLaVA's model classes
    {"ops"},  # the operations under test
    {"release"},  # a release's artifacts, each proved against what it was made from
    {"train"},  # stage-1 and LoRA training loops
    {"report"},  # results, environment, gate, reports
    {"oracle"},  # LLaVA's own code as the reference
    {"bench"},  # whole-process benchmarks
    {"options"},  # the run's options, declared once for the plugin and `llava-harness run`
    {"cli"},  # the command line and its commands
    {"plugin"},  # the pytest plugin
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
SHIPPED_DATA = {"suites", "fixtures"}  # mapped under harness/ in the wheel only


def _unit(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path):
    """(line, module parts, imported names) of each harness import, lazy imports included."""
    package = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package[: len(package) - node.level + 1] + (node.module or "").split(".")
            elif (node.module or "").split(".")[0] == "harness":
                parts = node.module.split(".")
            else:
                continue
            yield node.lineno, [p for p in parts if p], [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "harness":
                    yield node.lineno, alias.name.split("."), []


def _imported_units(path: Path):
    """(line, unit) for each harness unit the module imports."""
    for line, parts, names in _imports(path):
        for unit in parts[1:2] or names:
            yield line, unit


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] not in SHIPPED_DATA | {"__init__.py"}:
            yield path


def test_the_top_level_is_a_handful_of_concerns():
    entries = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
               if p.name != "__pycache__" and (p.suffix == ".py" or p.is_dir())}
    assert entries - SHIPPED_DATA - {"__init__"} == set(RANK)


def test_every_import_points_downward():
    wrong = []
    for path in _modules():
        me = _unit(path)
        for line, target in _imported_units(path):
            if target != me and target in RANK and RANK[target] > RANK[me]:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({me}) imports {target}")
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


# The builder is a client of the contract: what a checkpoint is comes from harness/llava/, so an
# operation (or the model, or the contract itself) that imports the builder to learn a layout
# has a second home for it.
NOT_FROM_THE_BUILDER = {"llava", "model", "ops", "train"}


def test_no_operation_imports_the_builder():
    wrong = [f"{path.relative_to(PACKAGE)}:{line} ({_unit(path)}) imports synth"
             for path in _modules() if _unit(path) in NOT_FROM_THE_BUILDER
             for line, target in _imported_units(path) if target == "synth"]
    assert not wrong, "\n".join(wrong)


def test_the_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "harness" / "checkpoint" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from ..synth.builder import build\n    return build\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "harness"
    try:
        assert [(line, unit) for line, unit in _imported_units(bad)] == [(2, "synth")]
    finally:
        PACKAGE = saved


def test_only_the_plugin_imports_pytest():
    # The library runs under the CLI and inside other tools too; pytest is the plugin's business.
    offenders = []
    for path in _modules():
        if _unit(path) == "plugin":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("pytest", "_pytest") for n in names):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, offenders


def _resolves(parts: list[str]) -> bool:
    here = PACKAGE.parent.joinpath(*parts)
    return here.with_suffix(".py").is_file() or (here / "__init__.py").is_file()


def test_every_harness_import_names_a_module_that_exists():
    # Lazy imports inside functions escape `import harness...` smoke tests; a layout move that
    # misses one shows up only when that code path runs. This reads them all.
    missing = []
    for path in _modules():
        for line, parts, names in _imports(path):
            parts = [PACKAGE.name, *parts[1:]]
            if not _resolves(parts) and not all(_resolves([*parts, n]) for n in names):
                missing.append(f"{path.relative_to(PACKAGE)}:{line} {'.'.join(parts)}")
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(p for p in parts if p != "__init__")


def _module_graph() -> dict[str, set[str]]:
    """module -> the harness modules it imports, function-level imports included. `from .x
    import name` is an arrow to x, or to x.name where name is a module."""
    graph = {}
    for path in _modules():
        targets = set()
        for _, parts, names in _imports(path):
            parts = [PACKAGE.name, *parts[1:]]
            subs = [n for n in names if _resolves([*parts, n])]
            targets |= {".".join([*parts, n][1:]) for n in subs}
            if len(subs) < len(names) or not names:
                targets.add(".".join(parts[1:]))
        graph[_module_name(path)] = {t for t in targets if t} - {_module_name(path)}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles():
    """A circle hides which module is the lower one: each can only be read with the other.
    Function-level imports count, since they exist to hide such arrows as often as to keep
    torch off a fast path."""
    circles = _circles(_module_graph())
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_circle_check_finds_one():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_nothing_below_the_command_line_imports_it():
    """The CLI is the top: commands call the library, never the other way (the plugin read
    the suite table from cli/run.py; it lives in data.py now)."""
    wrong = [f"{path.relative_to(PACKAGE)}:{line}" for path in _modules()
             if _unit(path) != "cli" for line, target in _imported_units(path) if target == "cli"]
    assert not wrong, "imports of the command line from below it:\n" + "\n".join(wrong)


# --- a function-level import is there to keep a heavy library off a module's import ----------

# Libraries whose import costs a path that never needs them (torch alone is ~1.2 GB, seconds
# from a cold page cache; matplotlib, numpy and tabulate tens of milliseconds), and libraries the
# harness's own install does not have. Anything else is imported at the top, where a reader
# sees the module's arrows at a glance.
HEAVY = {"torch", "transformers", "peft", "bitsandbytes", "safetensors.torch", "numpy", "PIL",
         "matplotlib", "tabulate", "tokenizers", "sentencepiece", "huggingface_hub", "accelerate"}
OPTIONAL = {"llava", "litgpt", "pynvml"}
# Run by path with another interpreter (`ab`'s other side): it imports that side's harness
# once it runs, and copes with one too old to have a module.
OTHER_INTERPRETERS = {"bench/ab_child.py"}


def _targets(path: Path, node) -> list[str]:
    """Dotted names an import statement loads: harness modules resolved, others as written."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        package = _module_name(path).split(".") if path.name != "__init__.py" else \
            [*_module_name(path).split("."), ""]
        base = ["harness", *[p for p in package[: len(package) - node.level] if p]]
        name = ".".join([*base, *([node.module] if node.module else [])])
    else:
        name = node.module or ""
    return [name, *(f"{name}.{a.name}" for a in node.names)]


def _import_statements(path: Path):
    """(statement, at function level) for each import, `if TYPE_CHECKING:` blocks left out."""
    tree = ast.parse(path.read_text())
    hidden = {id(n) for block in ast.walk(tree)
              if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
              for n in ast.walk(block)}
    lazy = {id(n) for fn in ast.walk(tree)
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(fn)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in hidden:
            yield node, id(node) in lazy


def _heavy_loaded() -> dict:
    """A function: dotted name -> the heavy or optional libraries importing it loads."""
    files = {"harness." + _module_name(p) if _module_name(p) else "harness": p
             for p in [*_modules(), PACKAGE / "__init__.py"]}
    eager = {name: {t for node, lazy in _import_statements(path) if not lazy
                    for t in _targets(path, node)} for name, path in files.items()}

    def loads(name: str) -> set[str]:
        # A plain walk of everything importing `name` runs (each package's __init__ on the way),
        # with its own visited set: a package whose __init__ imports its submodules re-enters
        # itself, and a cache filled mid-walk would answer for it with half a result.
        found, seen, todo = set(), set(), [name]
        while todo:
            parts = todo.pop().split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                found |= {prefix} & HEAVY | {parts[0]} & OPTIONAL
                if prefix not in seen:
                    seen.add(prefix)
                    todo += eager.get(prefix, ())
        return found

    return loads


def needless_lazy_imports(package: Path) -> list[str]:
    global PACKAGE
    saved, PACKAGE = PACKAGE, package
    try:
        loads, found = _heavy_loaded(), []
        for path in _modules():
            rel = path.relative_to(PACKAGE).as_posix()
            if rel in OTHER_INTERPRETERS:
                continue
            mine = loads("harness." + _module_name(path))
            lines = path.read_text().splitlines()
            for node, lazy in _import_statements(path):
                if not lazy:
                    continue
                kept_off = set().union(*map(loads, _targets(path, node))) - mine
                above = lines[node.lineno - 2] if node.lineno > 1 else ""
                # Its own line, or a whole-line comment above (not the line above's own remark).
                said = lines[node.lineno - 1] + (above if above.lstrip().startswith("#") else "")
                if not kept_off:
                    found.append(f"{rel}:{node.lineno}: {ast.unparse(node)} (keeps nothing "
                                 "heavy off this module: import it at the top)")
                elif not any(f"# heavy: {lib}" in said or f"# optional: {lib}" in said
                             for lib in kept_off):
                    heavy = sorted(kept_off - OPTIONAL)
                    why = f"heavy: {', '.join(heavy)}" if heavy else \
                        f"optional: {', '.join(sorted(kept_off))}"
                    found.append(f"{rel}:{node.lineno}: {ast.unparse(node)} (say why: '# {why}')")
        return found
    finally:
        PACKAGE = saved


def test_function_level_imports_only_keep_heavy_libraries_off():
    """An import inside a function hides an arrow from the reader; it earns its place only by
    keeping torch (or another heavy or optional library) off the module's import, and it says
    which on its line or the line above."""
    found = needless_lazy_imports(PACKAGE)
    assert not found, "function-level imports:\n" + "\n".join(found)


def test_the_lazy_import_check_catches_a_needless_one(tmp_path):
    package = tmp_path / "harness"
    (package / "ops").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "ops" / "__init__.py").write_text("")
    (package / "ops" / "light.py").write_text("import json\n")
    (package / "ops" / "heavy.py").write_text("import torch\n")
    (package / "ops" / "user.py").write_text(
        "def a():\n    from .light import json\n"            # needless
        "def b():\n    from .heavy import torch\n"           # heavy, but says nothing
        "def c():\n    from .heavy import torch  # heavy: torch\n"
        "def d():\n    # optional: llava\n    import llava\n")
    found = needless_lazy_imports(package)
    assert [f.split(" (")[0] for f in found] == [
        "ops/user.py:2: from .light import json", "ops/user.py:4: from .heavy import torch"]


def test_the_lazy_import_check_follows_a_package_that_imports_itself(tmp_path):
    """check/__init__ imports a and b, a imports torch: importing check.b loads torch, so a
    lazy import of it keeps torch off (a walk cached mid-circle once said it kept nothing)."""
    package = tmp_path / "harness"
    (package / "check").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "check" / "__init__.py").write_text("from . import a, b\n")
    (package / "check" / "a.py").write_text("import torch\n")
    (package / "check" / "b.py").write_text("import json\n")
    (package / "user.py").write_text("def f():\n    import harness.check.b  # heavy: torch\n")
    assert needless_lazy_imports(package) == []


def private_imports(package: Path) -> list[str]:
    """`from .module import _name` across modules: a private name is its module's business; one
    that another module needs is part of an interface and gets a public name."""
    found = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (
                    node.level or (node.module or "").split(".")[0] == "harness"):
                found += [f"{path.relative_to(package)}:{node.lineno}: {a.name}"
                          for a in node.names if a.name.startswith("_")
                          and not a.name.startswith("__")]
    return found


def test_no_module_imports_another_modules_private_name(tmp_path):
    assert not private_imports(PACKAGE), private_imports(PACKAGE)
    (tmp_path / "litgpt.py").write_text("from .strip import LM_AUX_FILES, _read_config\n")
    assert private_imports(tmp_path) == ["litgpt.py:1: _read_config"]
