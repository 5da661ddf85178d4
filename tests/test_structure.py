"""Guards of the house plan (the package's layout is being reorganized in slices, behaviour
unchanged):

* the import graph of ``src/orthoedit``, counting imports inside functions, has no cycle;
* no stage imports another stage (``STAGES``), and the layers below the stages (``runtime``,
  ``judging``, ``model``, ``edit``) import no stage;
* ``import orthoedit.cli`` and ``orthoedit apply --help`` load no torch;
* every ``docs/design.md §N`` a docstring cites is a section of the design document;
* no module is over 500 lines and no function over 60, except the declarative tables of
  ``DECLARATIVE`` (one pydantic model per stage);
* every command's options (names, flags, defaults, whether required) match
  ``tests/snapshots/cli-options.json``, taken before the move. After a deliberate change of
  the CLI, rewrite it with ``ORTHOEDIT_SNAPSHOT=write pytest tests/test_structure.py``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import typer.main

from orthoedit.cli import app

SRC = Path(__file__).resolve().parents[1] / "src"
SNAPSHOT = Path(__file__).resolve().parent / "snapshots" / "cli-options.json"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package)."""
    found = {}
    for path in (SRC / "orthoedit").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at any depth (module level, functions,
    TYPE_CHECKING blocks): ``from .x import y`` names ``x``, or ``x.y`` when that is a module."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, package) in modules.items():
        here = name if package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                for alias in node.names:
                    child = f"{origin}.{alias.name}"
                    targets.append(child if child in modules else origin)
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_sees_function_level_imports(tmp_path, monkeypatch):
    package = tmp_path / "orthoedit"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import f\n")
    (package / "b.py").write_text("def f():\n    from . import a\n")
    (package / "c.py").write_text("from orthoedit.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    graph = import_graph()
    assert graph["orthoedit.c"] == {"orthoedit.a"}
    assert cycles(graph) == [{"orthoedit.a", "orthoedit.b"}]


#: Modules that are tables, allowed over 500 lines: one pydantic model per stage's options.
DECLARATIVE = {"orthoedit.config"}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def long_code(modules: dict[str, tuple[Path, bool]]) -> list[str]:
    """Modules over ``MAX_MODULE_LINES`` (but the declarative ones) and functions over
    ``MAX_FUNCTION_LINES`` (decorators left out, docstring and signature counted)."""
    found = []
    for name, (path, _) in sorted(modules.items()):
        text = path.read_text()
        if name not in DECLARATIVE and len(text.splitlines()) > MAX_MODULE_LINES:
            found.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{name}.{node.name}: {length} lines")
    return found


def test_the_length_check_sees_long_functions_and_modules(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    long = tmp_path / "long.py"
    long.write_text(f"def f():\n{body}\n" + "\n" * MAX_MODULE_LINES)
    short = tmp_path / "short.py"
    short.write_text("def g():\n    return 1\n")
    found = long_code({"orthoedit.long": (long, False), "orthoedit.short": (short, False)})
    assert found == [
        f"orthoedit.long: {MAX_FUNCTION_LINES + MAX_MODULE_LINES + 1} lines",
        f"orthoedit.long.f: {MAX_FUNCTION_LINES + 1} lines",
    ]


def test_no_long_module_or_function():
    found = long_code(_modules())
    assert not found, f"over the house plan's lengths: {found}"


#: The stages (docs/design.md, layout): each imports the layers below it, never another stage;
#: only ``cli`` and ``pipeline`` know every stage.
STAGES = {
    "measure": "orthoedit.measure",
    "search": "orthoedit.search",
    "evaluate": "orthoedit.evaluate",
    "research": "orthoedit.research",
    "verify": "orthoedit.verify",
    "export": "orthoedit.export",
}
BELOW = ("orthoedit.runtime", "orthoedit.judging", "orthoedit.model", "orthoedit.edit")


def _stage_of(module: str) -> str | None:
    for stage, prefix in STAGES.items():
        if module == prefix or module.startswith(prefix + ".") or module.startswith(prefix + "_"):
            return stage
    return None


def stage_crossings(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a stage imports another stage, or a layer below the
    stages imports a stage."""
    found = []
    for module, targets in graph.items():
        mine = _stage_of(module)
        below = module.startswith(BELOW)
        for target in targets:
            theirs = _stage_of(target)
            if theirs is not None and (below or (mine is not None and theirs != mine)):
                found.append((module, target))
    return sorted(found)


def test_no_stage_imports_another():
    assert stage_crossings(import_graph()) == []


def test_the_stage_rule_sees_a_crossing():
    graph = {
        "orthoedit.search.confirm": {"orthoedit.evaluate.safety"},
        "orthoedit.judging.answers": {"orthoedit.measure.select"},
        "orthoedit.pipeline.run": {"orthoedit.search", "orthoedit.measure.candidates"},
        "orthoedit.verify_gguf": {"orthoedit.verify"},
    }
    assert stage_crossings(graph) == [
        ("orthoedit.judging.answers", "orthoedit.measure.select"),
        ("orthoedit.search.confirm", "orthoedit.evaluate.safety"),
    ]


def unresolved_imports(roots: list[Path]) -> list[str]:
    """``from orthoedit.x import y`` (at any depth, relative ones in the package too) whose
    module or name does not exist: what a move leaves behind in a function-level import."""
    import importlib

    found = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            package = None
            if SRC in path.parents:
                parts = list(path.relative_to(SRC).with_suffix("").parts)
                package = parts[:-1]
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.ImportFrom) or (node.level and package is None):
                    continue
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                if not module.startswith("orthoedit"):
                    continue
                try:
                    imported = importlib.import_module(module)
                except ImportError as err:
                    found.append(f"{path.name}:{node.lineno}: {module} ({err})")
                    continue
                for alias in node.names:
                    if not hasattr(imported, alias.name):
                        try:
                            importlib.import_module(f"{module}.{alias.name}")
                        except ImportError:
                            found.append(f"{path.name}:{node.lineno}: {module}.{alias.name}")
    return found


def test_every_import_of_the_project_resolves():
    """Function-level imports (which nothing runs until their function does) and the
    benchmarks' imports name modules and names that exist."""
    roots = [SRC / "orthoedit", *(SRC.parent / d for d in ("benchmarks", "tests", "examples"))]
    assert unresolved_imports(roots) == []


def test_the_import_check_sees_a_moved_name(tmp_path):
    (tmp_path / "late.py").write_text(
        "def f():\n    from orthoedit.measure.select import first_tokens\n"
        "    from orthoedit.runtime.gone import x\n    from orthoedit.prompts import load_sets\n"
    )
    found = unresolved_imports([tmp_path])
    assert len(found) == 2 and "first_tokens" in found[0] and "gone" in found[1]


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, f"import cycles: {[sorted(c) for c in found]}"


def test_the_cli_and_apply_help_load_no_torch():
    code = (
        "import sys\n"
        "import orthoedit.cli\n"
        "assert 'torch' not in sys.modules, 'import orthoedit.cli loaded torch'\n"
        "try:\n"
        "    orthoedit.cli.app(['apply', '--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'orthoedit apply --help loaded torch'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


def _options(command, path: tuple[str, ...] = ()) -> dict:
    """``command path`` -> its parameters (flags, default, required, multiple), for the
    app, every group and every command."""
    table = {}
    for name, sub in getattr(command, "commands", {}).items():
        table.update(_options(sub, (*path, name)))
    params = []
    for p in command.params:
        default = p.default
        if callable(default) or isinstance(default, Path):
            default = str(default)
        params.append(
            {
                "flags": sorted(p.opts + p.secondary_opts),
                "default": default,
                "required": p.required,
                "multiple": getattr(p, "multiple", False),
            }
        )
    # what a user types: flags (an argument by its name), defaults, required, repeatable; not
    # the Python parameter's name or the order help lists them in (one rule: cli/options.py)
    table[" ".join(path)] = sorted(params, key=lambda p: p["flags"])
    return table


def test_option_names_and_defaults_match_the_snapshot():
    now = json.loads(json.dumps(_options(typer.main.get_command(app)), default=str))
    if os.environ.get("ORTHOEDIT_SNAPSHOT") == "write":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        commands = [
            f"  {json.dumps(c)}: [\n"
            + ",\n".join(f"    {json.dumps(p, sort_keys=True)}" for p in now[c])
            + "\n  ]"
            for c in sorted(now)
        ]  # one line per option, so that a change reads as one line of a diff
        SNAPSHOT.write_text("{\n" + ",\n".join(commands) + "\n}\n")
    taken = json.loads(SNAPSHOT.read_text())
    assert sorted(now) == sorted(taken), "commands added or removed"
    for command, params in taken.items():
        assert now[command] == params, f"orthoedit {command}: options changed"


def test_design_sections_cited_by_docstrings_exist():
    design = (SRC.parent / "docs" / "design.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^\*\*§(\d+) ", design, re.M))
    assert sections == {str(n) for n in range(1, 10)}
    cited = set()
    for path in (SRC / "orthoedit").rglob("*.py"):
        for first, last in re.findall(r"docs/design\.md §(\d+)(?:-§(\d+))?", path.read_text()):
            cited.update(map(str, range(int(first), int(last or first) + 1)))
    assert cited and cited <= sections, sorted(cited - sections)


def test_every_stage_option_is_its_config_field_in_one_order():
    """A command's options are its config model's fields, each declared once (config.py), in
    one order for every command (cli/options.py): nothing is typed twice, none is left out."""
    from orthoedit import config
    from orthoedit.cli.options import order

    stages = {
        "measure": (config.MeasureConfig, ("model",)),
        "search": (config.SearchConfig, ("model",)),
        "apply": (config.ApplyConfig, ("model",)),
        "verify": (config.VerifyConfig, ("source", "edited")),
        "eval bench": (config.EvalBenchConfig, ("base", "edited")),
        "eval kl": (config.EvalKLConfig, ("base", "edited")),
        "eval safety": (config.EvalSafetyConfig, ("model",)),
        "compare": (config.CompareConfig, ("base", "edited")),
        "push": (config.PushConfig, ("model_dir", "repo_id")),
        "export gguf": (config.ExportGgufConfig, ("model_dir",)),
        "study sites": (config.StudySitesConfig, ("model",)),
        "attribute": (config.AttributeConfig, ("model",)),
    }
    root = typer.main.get_command(app)
    for path, (model, arguments) in stages.items():
        command = root
        for name in path.split():
            command = command.commands[name]
        assert [p.name for p in command.params] == order(model, arguments), path
        assert list(order(model, arguments)[: len(arguments)]) == list(arguments)
