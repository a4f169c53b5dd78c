"""finelap's packages and top-level modules import each other in one direction only: no import cycle
between them, function-local imports included, nor between the modules of finelap.eval; and
finelap.bad_input, which data, synthesis and evaluation all report bad input through, imports nothing
of finelap."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"finelap": ROOT / "finelap", "finelap.kernels": ROOT / "kernels"}  # setup.py's package_dir


def _module_name(package: str, folder: Path, path: Path) -> str:
    parts = [*package.split("."), *path.relative_to(folder).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str | None:
    """The part of finelap a module belongs to: its subpackage (data, synth, ...) or top-level module."""
    parts = module.split(".")
    return parts[1] if parts[0] == "finelap" and len(parts) > 1 else None


def _imported_modules(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every module an import statement anywhere in the file names (`from X import Y` counts X and X.Y)."""
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            imported.add(base)
            imported.update(f"{base}.{alias.name}" for alias in node.names)
    return imported


def _module_imports():
    """Yield (module name, every module its import statements name) for each source file of finelap."""
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            module = _module_name(package, folder, path)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            yield module, _imported_modules(tree, module, path.name == "__init__.py")


def package_graph() -> dict[str, set[str]]:
    """{part of finelap: the other parts it imports}."""
    graph: dict[str, set[str]] = {}
    for module, imported in _module_imports():
        unit = _unit(module)
        if unit is None:
            continue
        graph.setdefault(unit, set()).update(
            other for other in map(_unit, imported) if other is not None and other != unit
        )
    return graph


def module_graph(package: str) -> dict[str, set[str]]:
    """{module of `package`: the other modules of `package` it imports}."""
    imports = {module: imported for module, imported in _module_imports()
               if module == package or module.startswith(package + ".")}
    return {module: (imported & set(imports)) - {module} for module, imported in imports.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it was followed
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for other in sorted(graph.get(node, ())):
            if state.get(other) == "open":
                return path[path.index(other):] + [other]
            if other not in state and (cycle := visit(other)) is not None:
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_no_import_cycle_between_finelaps_packages():
    graph = package_graph()
    assert {"data", "synth", "eval", "models", "audio", "bad_input"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_the_modules_of_finelap_eval():
    graph = module_graph("finelap.eval")
    assert {"finelap.eval.config", "finelap.eval.readers", "finelap.eval.sed", "finelap.eval.cli"} <= set(graph)
    assert {"finelap.eval.sed", "finelap.eval.grounding"} <= graph["finelap.eval.saved_scores"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_bad_input_imports_nothing_of_finelap():
    assert package_graph()["bad_input"] == set()


def test_a_cycle_is_found():
    assert find_cycle({"data": {"audio", "synth"}, "synth": {"bad_input", "data"}, "audio": set()}) == [
        "data", "synth", "data"]
    assert find_cycle({"data": {"audio", "bad_input"}, "synth": {"data", "bad_input"}}) is None
