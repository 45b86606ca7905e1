"""The package layout reads top to bottom: every project import points down a layer.

Layers, lowest first (docs/design.md draws them): the shared core; the components that fit
maps and train the sweep's encoders; those built on them (the interference matrix, the engine
plugin); those that run engines (the benchmark, the HTTP server); the entry points on top.
An import from a package to one of its own layer or above is an arrow up (or a cycle), and
fails here, wherever it sits: a function-local import hides an arrow from readers, not from
this test. A project import inside a function must also say why it cannot sit at the top.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {
    "lingosteer": 0,
    "training": 1,
    "alignment": 1,
    "matrix": 2,
    "intervene_engine": 2,
    "evaluation": 3,
    "intervene_server": 3,
    "lingosteer.entrypoints": 4,
}
PACKAGES = {name.split(".")[0] for name in LAYERS}
LOCAL_IMPORT_REASON = "# local:"


def package_of(module: str) -> str | None:
    """The layer a dotted module name belongs to (None: not the project's)."""
    if module.split(".")[0] not in PACKAGES:
        return None
    return "lingosteer.entrypoints" if module.startswith("lingosteer.entrypoints") else module.split(".")[0]


def project_imports(path: Path):
    """(module imported, import node, inside a function?) for each absolute project import of a file."""
    tree = ast.parse(path.read_text(), filename=str(path))

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                yield from ((a.name, child, in_function) for a in child.names if package_of(a.name))
            elif isinstance(child, ast.ImportFrom) and not child.level and package_of(child.module):
                yield child.module, child, in_function
            yield from visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    yield from visit(tree, False)


def component_files():
    for package in sorted(PACKAGES):
        yield from sorted((ROOT / package).rglob("*.py"))


def test_every_import_points_down_a_layer():
    arrows_up = []
    for path in component_files():
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        source = package_of(module)
        for imported, node, _ in project_imports(path):
            target = package_of(imported)
            if target != source and LAYERS[target] >= LAYERS[source]:
                arrows_up.append(f"{path.relative_to(ROOT)}:{node.lineno}: {source} -> {imported}")
    assert not arrows_up, "imports that point up a layer (or across one):\n" + "\n".join(arrows_up)


def test_every_function_local_project_import_says_why():
    unexplained = []
    for path in component_files():
        lines = path.read_text().splitlines()
        for imported, node, in_function in project_imports(path):
            if not in_function or _explained(lines, node):
                continue
            unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}: {imported}")
    assert not unexplained, (f"function-local project imports without a '{LOCAL_IMPORT_REASON} why' comment "
                             "(on the line, or above the block of imports it heads):\n" + "\n".join(unexplained))


def _explained(lines: list[str], node: ast.stmt) -> bool:
    if any(LOCAL_IMPORT_REASON in line for line in lines[node.lineno - 1 : node.end_lineno]):
        return True
    # Or a comment above the block of imports and comments it stands in.
    row = node.lineno - 2
    while row >= 0 and lines[row].strip().startswith(("import ", "from ", "#")):
        if lines[row].strip().startswith(LOCAL_IMPORT_REASON):
            return True
        row -= 1
    return False


@pytest.mark.parametrize("source, imported", [("alignment", "evaluation.stats"),
                                              ("lingosteer", "alignment.artifact"),
                                              ("evaluation", "intervene_server.routing"),
                                              ("intervene_engine", "evaluation.scoring")])
def test_arrows_up_are_recognised(source, imported):
    """The layer table itself: these arrows (each one the code had once) point up."""
    assert LAYERS[package_of(imported)] >= LAYERS[source]
