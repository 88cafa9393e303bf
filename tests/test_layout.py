"""The shape of the repository: one flat file per concern, no import cycle between them (also none hidden
inside functions), every file opening with the docstring that says what it holds, and train.py's functions
short enough to read."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in REPO.glob("*.py")}


def project_imports(path: Path) -> set:
    """The project modules a file imports anywhere in it: at the top, or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(MODULES)


def test_no_import_cycle_between_the_project_files():
    graph = {name: project_imports(path) - {name} for name, path in MODULES.items()}
    done, stack = set(), []

    def visit(name):
        if name in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        stack.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert "train" not in set().union(*(deps for name, deps in graph.items() if name != "tutorial"))


def test_every_file_opens_with_a_docstring_of_what_it_holds():
    for name, path in MODULES.items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.startswith(f"{name}.py --"), f"{path.name} must open with '{name}.py -- ...'"


def test_no_function_in_train_py_is_over_80_lines():
    tree = ast.parse(MODULES["train"].read_text())
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80]
    assert not long, f"functions over 80 lines in train.py: {long}"
