"""The shape of the repository: one flat file per concern, no import cycle between them (also none hidden
inside functions), every file opening with the docstring that says what it holds, the functions of the
reader's path (model.py, dynlora.py, train.py) short enough to read, no method list written out anywhere
but in dynlora.py's registry, and CI running the linter before the tests."""

import ast
import re
import tomllib
from pathlib import Path

import pytest

import dynlora

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


# What a run needs (train.py, on the reader's path) imports no command, benchmark, report or plot: those
# modules call into train.py, never the other way; the settings, run folders and result records are runs.py's.
# analysis.py is imported for the gates' statistics that a finished run records (analysis.inference_forms);
# it never imports train.py either.
TRAIN_MAY_IMPORT = {"model", "dynlora", "data", "runtime", "runs", "analysis"}
TRAIN_MUST_NOT_IMPORT = {"cli", "report", "plots", "planted", "tune", "bench", "zeroshot", "imports"}


def test_train_imports_only_what_a_run_needs_and_nothing_imports_the_command_line():
    graph = {name: project_imports(path) - {name} for name, path in MODULES.items()}
    assert graph["train"] <= TRAIN_MAY_IMPORT, f"train.py imports {sorted(graph['train'] - TRAIN_MAY_IMPORT)}"
    assert not graph["train"] & TRAIN_MUST_NOT_IMPORT
    assert "cli" in MODULES and not [name for name, deps in graph.items() if "cli" in deps], \
        "cli.py is the entry point: no project file imports it"
    defined = {node.name for node in ast.parse(MODULES["train"].read_text()).body if isinstance(node, ast.FunctionDef)}
    assert not defined & {"main", "build_parser", "run_command", "main_job"}, "the command line is cli.py's"


def test_every_file_opens_with_a_docstring_of_what_it_holds():
    for name, path in MODULES.items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.startswith(f"{name}.py --"), f"{path.name} must open with '{name}.py -- ...'"


READERS_PATH = ("model", "dynlora", "train")
MAX_FUNCTION_LINES = 50


@pytest.mark.parametrize("name", READERS_PATH)
def test_no_function_on_the_readers_path_is_over_50_lines(name):
    tree = ast.parse(MODULES[name].read_text())
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines in {name}.py: {long}"


def method_lists(path: Path, names: set) -> list:
    """(line, names) of every literal in a file that writes out two or more method names: a list, tuple or set
    of them, or a comma-separated string of them ("lora,alloc,gate")."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            listed = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in names]
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and re.fullmatch(r"[\w-]+(,[\w-]+)+", node.value)):
            listed = [m for m in node.value.split(",") if m in names]
        else:
            continue
        if len(set(listed)) >= 2:
            found.append((node.lineno, listed))
    return found


def test_method_lists_are_derived_from_the_registry(tmp_path):
    """A new method is one METHODS entry: every other file derives its methods from dynlora.method_names() or
    dynlora.METHODS, so no table, plot, benchmark or flag default can leave one out."""
    names = set(dynlora.method_names())
    sample = tmp_path / "sample.py"                                         # the check sees each kind of list
    sample.write_text('A = ["full", "lora"]\nB = {"alloc", "gate"}\nC = ("x", "dynlora", "adalora")\n'
                      'D = "lora,gate"\nE = ("lora",)\nF = "lora, gate: prose"\n')
    assert [line for line, _ in method_lists(sample, names)] == [1, 2, 3, 4]
    written = {p.name: found for p in MODULES.values() if p.stem != "dynlora" and (found := method_lists(p, names))}
    assert not written, f"method lists written out (derive them from dynlora.method_names()): {written}"


def test_the_readme_is_a_front_door_whose_map_and_links_are_true():
    """README.md stays short (at most 250 lines), keeps CI's test command (.ci/run runs the README's) and the
    main job's, lists every project file in its map and no file that is not there, and every relative link of
    the README, RESULTS.md and docs/ points at a file that exists."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250, f"README.md has {len(readme.splitlines())} lines: move text to docs/"
    assert "\npython -m pytest\n" in readme and "python cli.py" in readme
    section = readme.split("## What is in the repository", 1)[1].split("\n## ", 1)[0]
    mapped = set(re.findall(r"^\| `([\w/.]+)` \|", section, re.M))
    files = {f"{name}.py" for name in MODULES}
    assert files <= mapped, f"not in the README's map: {sorted(files - mapped)}"
    assert all((REPO / name).exists() for name in mapped), f"mapped but missing: {sorted(mapped)}"
    def anchors(path):                                              # GitHub's heading slugs
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}
    for page in [REPO / "README.md", REPO / "RESULTS.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", page.read_text()):
            path = page.parent / target if target else page
            assert path.exists(), f"{page.name} links to {target}, which does not exist"
            assert not anchor or path.suffix != ".md" or anchor in anchors(path), \
                f"{page.name}: no #{anchor} in {target}"


def test_ci_lints_first_with_ruff_toml_settings():
    """CI (.ci/run) runs `ruff check .` before the tests, with ruff pinned in requirements.txt and its settings in
    ruff.toml: lines of at most 120 characters, pycodestyle's errors and warnings and pyflakes (E, W, F)."""
    config = tomllib.loads((REPO / "ruff.toml").read_text())
    assert config["line-length"] == 120 and set(config["lint"]["select"]) == {"E", "F", "W"}
    ci = (REPO / ".ci" / "run").read_text()
    assert "\nruff check ." in ci and ci.index("ruff check .") < ci.index("python -m pytest")
    assert re.search(r"^ruff==\d+\.\d+\.\d+ ", (REPO / "requirements.txt").read_text(), re.M)


def test_the_readmes_tutorial_map_lists_every_notebook_in_order():
    """The README's numbered tutorial list links each notebook of notebooks/ once, in the notebooks' order."""
    readme = (REPO / "README.md").read_text()
    listed = re.findall(r"^\d+\. \[`[^`]+`\]\(notebooks/([\w.]+\.ipynb)\)", readme, re.M)
    assert listed == sorted(p.name for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")), listed
