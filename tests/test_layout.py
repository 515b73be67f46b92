"""The project's layout and import rules, read from the source (every import, at module level or inside a
function):

* the core's folders show its architecture: ``alignment/algorithms`` (the online loop and its pieces,
  the algorithms, their advantage and loss registries), ``alignment/rewards`` (reward-model training and
  scoring, the reward components and ensembles), ``alignment/evaluation`` (scoring, the judge, gold
  checks, statistics, the verdict, the over-optimisation alarm, length-aware readings), ``alignment/rounds``
  (on-policy re-training: the preference store, the samples and labels stages, a round's wiring, the
  rounds report); the old top-level modules are gone
  and nothing imports them;
* the core (``alignment/``) imports nothing from Prefect, ``tasks``, ``flows``, ``deployments`` or ``cli``;
* the layers only import downwards: cli -> deployments -> flows -> tasks -> alignment;
* no stage borrows from another stage's training module (``alignment.algorithms.reinforce`` is imported
  by no other core module but the pipeline's config and the comparison, which compose every stage's,
  and ``alignment.algorithms.grpo``, REINFORCE's loop with another baseline and loss);
* there is no import circle anywhere among the project's modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("alignment", "tasks", "flows", "deployments", "cli")
LAYER = {"alignment": 0, "tasks": 1, "flows": 2, "deployments": 3, "cli": 4}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names, wherever the statement stands."""
    names: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return names


def project_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in imports_of(path) if m in modules and m != name}
    return graph


SUBPACKAGES = ("alignment/algorithms", "alignment/rewards", "alignment/evaluation", "alignment/rounds")
GONE = ("rl", "reward", "reinforce", "grpo", "ppo", "dpo", "sft", "evaluate", "verdict", "judge", "gold", "stats")


def test_the_layout_shows_the_architecture():
    for package in SUBPACKAGES:
        assert (ROOT / package / "__init__.py").is_file(), f"{package} is not a package"
    for module in ("online", "guard", "sampler", "metrics", "advantages", "losses", "registry", "reinforce", "grpo",
                   "ppo", "dpo", "sft"):
        assert (ROOT / "alignment" / "algorithms" / f"{module}.py").is_file(), module
    assert (ROOT / "alignment" / "rewards" / "model.py").is_file()
    for module in ("evaluate", "verdict", "judge", "gold", "stats", "alarm", "length"):
        assert (ROOT / "alignment" / "evaluation" / f"{module}.py").is_file(), module
    for module in ("config", "store", "onpolicy", "plan", "report"):
        assert (ROOT / "alignment" / "rounds" / f"{module}.py").is_file(), module
    left = [f"alignment/{name}.py" for name in GONE if (ROOT / "alignment" / f"{name}.py").exists()]
    assert not left, f"old top-level modules are back: {left}"


def top_level_names(path: Path) -> set[str]:
    """The names a module binds at its top level (definitions, assignments, imports)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def test_every_import_of_the_core_names_a_module_that_exists():
    """An import of ``alignment.<x>`` (anywhere: the layers, tests, bench, scripts) names one of the core's
    modules, and ``from <package> import <x>`` a submodule of it or a name it defines: no import of a
    module that moved away survives."""
    files = {module_name(p): p for p in (ROOT / "alignment").rglob("*.py")}
    bad = []
    for folder in (*PACKAGES, "tests", "bench", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    named = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    named = [node.module or ""]
                    if node.module in files and files[node.module].name == "__init__.py":  # from a package
                        named += [f"{node.module}.{a.name}" for a in node.names
                                  if a.name not in top_level_names(files[node.module])]
                else:
                    continue
                bad += [f"{path.relative_to(ROOT)}:{node.lineno}: {m}" for m in named
                        if m.split(".")[0] == "alignment" and m not in files]
    assert not bad, "imports of modules that do not exist:\n" + "\n".join(bad)


def test_the_core_imports_no_orchestration_code():
    bad = []
    for path in (ROOT / "alignment").rglob("*.py"):
        for mod in imports_of(path):
            if mod.split(".")[0] in ("prefect", "tasks", "flows", "deployments", "cli"):
                bad.append(f"{path.relative_to(ROOT)}: {mod}")
    assert not bad, "the core imports orchestration code:\n" + "\n".join(bad)


def test_layers_import_only_downwards():
    bad = [f"{a} -> {b}" for a, targets in project_graph().items() for b in targets
           if LAYER[b.split(".")[0]] > LAYER[a.split(".")[0]]]
    assert not bad, "\n".join(bad)


def test_no_stage_borrows_from_a_training_module():
    training = {"alignment.algorithms.reinforce"}
    composer = {"alignment.pipeline", "alignment.compare"}  # they compose every stage's config
    variants = {"alignment.algorithms.grpo"}  # REINFORCE's loop with another baseline and loss: subclasses the recipe
    bad = [f"{a} -> {b}" for a, targets in project_graph().items() if a.startswith("alignment.")
           for b in targets & training if a not in training | composer | variants]
    assert not bad, "\n".join(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle():
    cycle = find_cycle(project_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
])
def test_the_cycle_finder_finds_cycles(graph, cycle):
    assert find_cycle(graph) == cycle


def test_the_import_reader_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "alignment"
    pkg.mkdir()
    (pkg / "x.py").write_text("def f():\n    from prefect import flow\n    from .y import z\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert {"prefect", "prefect.flow", "alignment.y", "alignment.y.z"} <= imports_of(pkg / "x.py")
