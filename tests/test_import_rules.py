"""The layering rules of docs/ARCHITECTURE.md, checked on the import graph of the `bml` package.

The graph is read from the source (every `import` statement, also those inside functions), so a lazy
import that would break a rule, or close a cycle, counts too. `bml/__init__.py` loads nothing of the package when
imported (`FewShotClassifier` is looked up lazily), so it does not count as loaded with its submodules.
"""
from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "bml"
INFERENCE = ("bml.checkpoint", "bml.classifier", "bml.predict", "bml.calibration", "bml.contact_sheet",
             "bml.evaluation", "bml.scoring")
"""Loading a model and using it: what `from bml import FewShotClassifier` and `python -m bml.predict` need."""
TRAINING = ("bml.training", "bml.train", "bml.train_baseline", "bml.launch", "bml.methods", "bml.recipes")
DATA = ("bml.datasets",)
DATA_MUST_NOT_REACH = ("bml.methods", "bml.recipes", "bml.training", "bml.evaluation", "bml.models", "bml.train")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE_ROOT.rglob("*.py")}


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The `bml` modules an import statement loads (a package's submodule when it names one)."""
    known = modules()
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    if node.level:
        package = importer if modules()[importer].name == "__init__.py" else importer.rsplit(".", 1)[0]
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    if not base.startswith("bml"):
        return []
    targets = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
    return targets or ([base] if base in known else [])


@cache
def imports(module: str) -> frozenset[str]:
    """The `bml` modules `module` imports, wherever in it the import stands."""
    found = set()
    for node in ast.walk(ast.parse(modules()[module].read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(resolve(module, node))
    found.discard(module)
    return frozenset(found)


def reachable(start: str) -> set[str]:
    """Every `bml` module that importing `start` may load (a submodule also loads its packages)."""
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parents = [".".join(module.split(".")[:i]) for i in range(2, module.count(".") + 1)]   # `bml` is lazy
        todo.extend(parent for parent in parents if parent in modules())
        todo.extend(imports(module))
    return seen


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def test_the_graph_is_read():
    assert "bml.training.driver" in modules() and "bml.checkpoint" in imports("bml.training.state")


def test_inference_never_imports_training():
    for start in (module for module in modules() if within(module, INFERENCE)):
        reached = sorted(module for module in reachable(start) if within(module, TRAINING))
        assert not reached, f"{start} reaches training modules {reached}"


def test_the_data_layer_knows_no_training_methods_models_or_evaluation():
    for start in (module for module in modules() if within(module, DATA)):
        reached = sorted(module for module in reachable(start) if within(module, DATA_MUST_NOT_REACH))
        assert not reached, f"{start} reaches {reached}"


def test_no_import_cycles():
    """No module reaches itself through its imports (lazy ones too: two modules that need each other are one
    concern, or share a third)."""
    graph = {module: imports(module) for module in modules()}
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            assert module != start, f"import cycle through {start}"
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
