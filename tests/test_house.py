"""The house's shape (issue 30): no import circle among the package's modules, function-level imports
included (a lazy import still ties two modules together for a reader and for refactors)."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "latent_dmmd")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(os.path.abspath(PACKAGE)))[:-3].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (``from .x import y`` counts as the
    module ``x.y`` when that is a module, else ``x``)."""
    paths = {}
    for root, _, files in os.walk(os.path.abspath(PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                paths[module_name(os.path.join(root, name))] = os.path.join(root, name)
    graph = {}
    for mod, path in paths.items():
        package = mod.split(".") if path.endswith("__init__.py") else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
                named = {f"{target}.{a.name}" for a in node.names} & set(paths)
                deps |= named or {target}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[mod] = {d for d in deps if d in paths and d != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert "latent_dmmd.pipelines.pipeline_dmmd" in graph and "latent_dmmd.upload" in graph["latent_dmmd.pipelines.pipeline_dmmd"]
    assert cycles(graph) == []
