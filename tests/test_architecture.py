"""The dependency direction of docs/architecture.md, read from the import graph of the
source (every import, at module level or inside a function):

    core (rlaif_ray/, in packages by concern)  <-  Ray layer (actors/)  <-  commands (rlaif_ray/commands/)

and inside the core, package by package (rlaif_ray/__init__.py):

    base (config, storage, remote_folder, rubrics) <- data <- engines <- feedback <- rl <- run

No core module imports Ray, `actors` or a command; the CPU package is imported on the
start-up path only; no actor imports a command; there is no cycle among the project's
modules; every package says in its docstring what it holds and may import; and no
production function is longer than 60 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# each core package and the packages it may import (the base modules are their own "packages")
MAY_IMPORT = {
    "base": {"base"},
    "data": {"base", "data"},
    "engines": {"base", "data", "engines"},
    "feedback": {"base", "data", "engines", "feedback"},
    "rl": {"base", "data", "engines", "feedback", "rl"},
    "run": {"base", "data", "engines", "feedback", "rl", "run", "cpu"},
    "cpu": {"base", "engines", "cpu"},
}
BASE = {"rlaif_ray", "rlaif_ray.config", "rlaif_ray.storage", "rlaif_ray.remote_folder", "rlaif_ray.rubrics"}
# the start-up path: the only modules outside rlaif_ray/cpu that may import it
CPU_USERS = {"rlaif_ray.run.resolve", "rlaif_ray.run.preflight", "rlaif_ray.commands.cli", "actors.process",
             "actors.pipeline"}
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = [*(ROOT / "rlaif_ray").rglob("*.py"), *(ROOT / "actors").rglob("*.py")]
    return {module_name(f): f for f in files}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules and `ray` that `name` imports (from x import y counts x.y if a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if t == "ray" or t.startswith("ray."):
                out.add("ray")
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def layer(name: str) -> str:
    if name.startswith("rlaif_ray.commands"):
        return "commands"
    if name.startswith("actors"):
        return "actors"
    return "core"


def package(name: str) -> str:
    """The core package of a core module: base, data, engines, feedback, rl, run or cpu."""
    return "base" if name in BASE else name.split(".")[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {name: imports_of(path, name, set(mods)) for name, path in mods.items()}


def test_the_graph_is_read(graph):
    """The reader sees what is there (a broken reader would pass every rule below)."""
    assert "rlaif_ray.commands.train" in graph and "actors.learner" in graph
    assert "actors.generator" in graph["actors.pipeline"] and "actors.training" in graph["rlaif_ray.commands.train"]
    assert "rlaif_ray.rl.learner" in graph["actors.learner"] and "ray" in graph["actors.learner"]
    assert "rlaif_ray.engines.lm" in graph["rlaif_ray.rl.learner"] and "rlaif_ray.config" in graph["rlaif_ray.rl.learner"]


def test_core_imports_no_ray_no_actors_no_commands(graph):
    bad = {m: sorted(d for d in deps if d == "ray" or layer(d) != "core")
           for m, deps in graph.items() if layer(m) == "core"}
    assert not {m: d for m, d in bad.items() if d}, "core modules must not import Ray, actors or commands"


def test_core_packages_import_one_way(graph):
    """A package imports only those before it in rlaif_ray/__init__.py's order (and itself)."""
    bad = {}
    for m, deps in graph.items():
        if layer(m) != "core":
            continue
        wrong = sorted(d for d in deps if d != "ray" and layer(d) == "core"
                       and package(d) not in MAY_IMPORT[package(m)])
        if wrong:
            bad[m] = wrong
    assert not bad, f"imports against the package order: {bad}"


def test_the_cpu_package_is_imported_on_the_start_up_path_only(graph):
    users = {m for m, deps in graph.items() for d in deps
             if d.startswith("rlaif_ray.cpu") and not m.startswith("rlaif_ray.cpu")}
    assert users and users <= CPU_USERS, f"modules outside the start-up path import rlaif_ray.cpu: {users - CPU_USERS}"


def test_actors_import_no_commands(graph):
    bad = {m: sorted(d for d in deps if layer(d) == "commands") for m, deps in graph.items() if layer(m) == "actors"}
    assert not {m: d for m, d in bad.items() if d}


def test_no_import_cycles(graph):
    edges = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_every_package_says_what_it_holds_and_may_import():
    for init in [*(ROOT / "rlaif_ray").rglob("__init__.py"), ROOT / "actors" / "__init__.py"]:
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 80, f"{init.relative_to(ROOT)}: no docstring saying what the package holds"
        if init.parent.name not in ("rlaif_ray",):
            assert "may import" in doc.lower(), f"{init.relative_to(ROOT)}: the docstring does not say what it may import"


def test_no_production_function_is_longer_than_60_lines():
    long = []
    for name, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 60 lines: " + "; ".join(long)


def test_commands_each_have_a_module():
    """`rlaif-ray COMMAND` runs rlaif_ray/commands/<module>.py (the CLI dispatches, nothing else)."""
    cli = (ROOT / "rlaif_ray" / "commands" / "cli.py").read_text()
    for command, module in [("train", "train"), ("eval", "evaluate"), ("sft", "sft"), ("train-rm", "train_rm"),
                            ("sample-pairs", "sample_pairs"), ("run", "run_chain"), ("label", "label"),
                            ("eval-labeler", "eval_labeler"), ("serve-labeler", "serve_labeler"),
                            ("signal", "signal")]:
        assert f'"{command}"' in cli and (ROOT / "rlaif_ray" / "commands" / f"{module}.py").is_file()
        assert f"rlaif_ray.commands.{module} import" in cli or f"from .{module} import" in cli
