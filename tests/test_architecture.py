"""The dependency direction of docs/architecture.md, read from the import graph of the
source (every import, at module level or inside a function):

    core (rlaif_ray/*.py)  <-  Ray shells (actors/)  <-  commands (rlaif_ray/commands/)

No core module imports Ray, `actors` or a command; no actor imports a command; and there
is no cycle among the project's modules."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {name: imports_of(path, name, set(mods)) for name, path in mods.items()}


def test_the_graph_is_read(graph):
    """The reader sees what is there (a broken reader would pass every rule below)."""
    assert "rlaif_ray.commands.train" in graph and "actors.learner" in graph
    assert "actors.generator" in graph["rlaif_ray.commands.pipeline"]
    assert "rlaif_ray.learner" in graph["actors.learner"] and "ray" in graph["actors.learner"]


def test_core_imports_no_ray_no_actors_no_commands(graph):
    bad = {m: sorted(d for d in deps if d == "ray" or layer(d) != "core")
           for m, deps in graph.items() if layer(m) == "core"}
    assert not {m: d for m, d in bad.items() if d}, "core modules must not import Ray, actors or commands"


def test_actors_import_no_commands(graph):
    bad = {m: sorted(d for d in deps if layer(d) == "commands") for m, deps in graph.items() if layer(m) == "actors"}
    assert not {m: d for m, d in bad.items() if d}


def test_no_import_cycles(graph):
    edges = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    # a package's __init__ is imported by its modules' imports; it imports nothing of theirs here
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


def test_commands_each_have_a_module():
    """`rlaif-ray COMMAND` runs rlaif_ray/commands/<module>.py (the CLI dispatches, nothing else)."""
    cli = (ROOT / "rlaif_ray" / "commands" / "cli.py").read_text()
    for command, module in [("train", "train"), ("eval", "evaluate"), ("sft", "sft"), ("train-rm", "train_rm"),
                            ("sample-pairs", "sample_pairs"), ("run", "run_chain"), ("label", "label"),
                            ("eval-labeler", "eval_labeler"), ("serve-labeler", "serve_labeler"),
                            ("signal", "signal")]:
        assert f'"{command}"' in cli and (ROOT / "rlaif_ray" / "commands" / f"{module}.py").is_file()
        assert f"from .{module} import" in cli
