"""vlm's modules import one way: no cycle in the import graph, imports inside functions counted."""
import ast
from pathlib import Path

import vlm

ROOT = Path(vlm.__file__).resolve().parent


def module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = ("vlm",) + path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def owner(name: str, names: dict[str, Path]) -> str | None:
    """The vlm module an imported name lives in (``vlm.a.b.func`` -> ``vlm.a.b``)."""
    while name and name not in names:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, path: Path, names: dict[str, Path]) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):  # every import, at module level or inside a function
        if isinstance(node, ast.Import):
            found |= {owner(a.name, names) for a in node.names if a.name.startswith("vlm")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                stem = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(stem + ([node.module] if node.module else []))
            if base.split(".")[0] == "vlm":
                found |= {owner(f"{base}.{a.name}", names) for a in node.names}
    return found - {None, module}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_vlm():
    names = module_names()
    graph = {m: imports(m, p, names) for m, p in names.items()}
    assert cycles(graph) == []


# the command line composes recipes (``data=OPTION``) with the recipe composer, which lives with training's config
EVAL_MAY_IMPORT_FROM_TRAIN = {("vlm.eval.__main__", "vlm.train.config")}


def test_evaluation_sits_below_training():
    """No module of ``vlm/eval`` imports ``vlm.train`` (training's evaluation calls ``vlm.eval.evaluator``, not the
    other way), besides the command line's recipe composer."""
    names = module_names()
    found = {(m, i) for m, p in names.items() if m == "vlm.eval" or m.startswith("vlm.eval.")
             for i in imports(m, p, names) if i == "vlm.train" or i.startswith("vlm.train.")}
    assert found <= EVAL_MAY_IMPORT_FROM_TRAIN, sorted(found - EVAL_MAY_IMPORT_FROM_TRAIN)
