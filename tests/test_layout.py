"""The package layout and its import layering, read from the source with `ast` (nothing imported).

cli/api -> pipelines -> workers -> core; core is data/, models/, training/, evaluation/ and util/,
which import each other only in the order util <- data <- models <- training <- evaluation, and
config.py and errors.py sit below them all. Imports inside functions count as much as the ones at
the top of a module: a lazy import still makes a cycle when it runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "draftalign"
ROOT_MODULES = {"__init__", "__main__", "cli", "api", "config", "errors"}
CORE = ("util", "data", "models", "training", "evaluation")  # lowest first
ABOVE_CORE = ("pipelines", "workers", "cluster", "cli", "api", "__main__")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The draftalign modules `name` imports anywhere in its file (top level or in functions)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "draftalign")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "draftalign":
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                out.add(sub if sub in known else module)
    # `import draftalign.a.b` names a module; keep the longest known prefix of each name
    resolved = set()
    for mod in out:
        parts = mod.split(".")
        while ".".join(parts) not in known and len(parts) > 1:
            parts.pop()
        resolved.add(".".join(parts))
    resolved.discard(name)
    return resolved


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _area(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_package_root_holds_only_the_entry_points_config_and_errors():
    root = {p.stem for p in PKG.glob("*.py")}
    assert ROOT_MODULES <= root
    extra = root - ROOT_MODULES
    assert len(extra) <= 2, f"modules at the package root beyond {sorted(ROOT_MODULES)}: {sorted(extra)}"
    for sub in CORE:
        assert (PKG / sub / "__init__.py").is_file(), sub


def test_the_graph_sees_module_level_and_function_level_imports():
    graph = _graph()
    assert "draftalign.util.atomicio" in graph["draftalign.evaluation.report"]  # module level
    assert "draftalign.config" in graph["draftalign.util.redact"]  # inside a function
    assert "draftalign.api" in graph["draftalign"]  # `from draftalign import api` in __getattr__


def test_draftalign_modules_import_each_other_without_a_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        stack.append(mod)
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)


def test_core_modules_import_only_config_errors_and_core_below_them():
    bad = []
    for mod, deps in _graph().items():
        area = _area(mod)
        if area not in CORE:
            continue
        for dep in deps:
            dep_area = _area(dep)
            if dep_area in ABOVE_CORE or dep == "draftalign":
                bad.append(f"{mod} imports {dep} (above core)")
            elif dep_area in CORE and CORE.index(dep_area) > CORE.index(area):
                bad.append(f"{mod} imports {dep} ({dep_area} sits above {area})")
    assert not bad, "\n".join(bad)


def test_config_and_errors_import_nothing_above_them():
    graph = _graph()
    assert graph["draftalign.errors"] == set()
    assert graph["draftalign.config"] <= {"draftalign.errors"}


def test_docs_layout_names_every_module_and_only_modules_that_exist():
    """docs/layout.md is the map of the package: a module missing from it is one a reader cannot find."""
    import re

    page = (PKG.parent / "docs" / "layout.md").read_text(encoding="utf-8")
    block = page.split("```")[1]  # the tree
    named = set(re.findall(r"^  ([\w/]+\.py)\s", block, flags=re.MULTILINE))
    actual = {p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if p.name != "__init__.py"}
    assert not actual - named, f"modules docs/layout.md does not name: {sorted(actual - named)}"
    assert not named - actual, f"docs/layout.md names modules that do not exist: {sorted(named - actual)}"
