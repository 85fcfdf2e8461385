"""The import picture of the code: which floor may import which, no import circle between modules, and no
script that edits sys.path to find the project (every script and benchmark runs as `python -m ...` from the
checkout's root, or through the `fedsubspace` command).

Floors, bottom up: common/ (the base both sides import), then methods/, server_app/ and client_app/ (the
system), then harness/ (what drives the system in one process: fakes, tiny models), then bench/ and scripts/,
then tests/. Imports inside functions count: a lazy import is an import all the same.
"""

from __future__ import annotations

import ast
import os

import pytest

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("common", "methods", "server_app", "client_app", "harness", "bench", "scripts", "tests")
# package -> the packages of ours it must never import
FORBIDDEN = {
    "common": {"methods", "server_app", "client_app", "harness", "bench", "scripts", "tests"},
    "methods": {"client_app", "harness", "bench", "scripts", "tests"},
    "server_app": {"client_app", "harness", "bench", "scripts", "tests"},
    "client_app": {"server_app", "harness", "bench", "scripts", "tests"},
    "harness": {"bench", "scripts", "tests"},
    "bench": {"tests"},
    "scripts": {"bench", "tests"},
}
# The `fedsubspace` command sits above every floor (it runs the scripts, the benchmark and the server's export)
# though it lives in common/ so that the package's entry point has one home: the one module allowed upwards.
ABOVE_ALL = {"common.cli"}


def modules() -> dict[str, ast.Module]:
    found = {}
    for package in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = [d for d in dirs if d not in ("__pycache__", "fixtures")]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    with open(path, encoding="utf-8") as f:
                        found[dotted] = ast.parse(f.read(), path)
    return found


def imported(tree: ast.Module) -> set[str]:
    """Every absolute module name `tree` imports, at module level or inside functions (`from a import b` gives
    both a and a.b: b may be a module)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def graph(found: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (a name resolved to its longest module prefix; a package's own
    submodules and ancestors left out: importing a.b runs a/__init__.py, which is not a dependency on a.b)."""
    edges = {}
    for module, tree in found.items():
        edges[module] = set()
        for name in imported(tree):
            parts = name.split(".")
            target = next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in found), None)
            if (
                target
                and target != module
                and not module.startswith(target + ".")
                and not target.startswith(module + ".")
            ):
                edges[module].add(target)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_in_a_circle():
    assert circles(graph(modules())) == []


def test_each_floor_imports_only_what_is_below_it():
    wrong = []
    for module, targets in graph(modules()).items():
        package = module.split(".")[0]
        if module in ABOVE_ALL:
            continue
        for target in sorted(targets):
            if target.split(".")[0] in FORBIDDEN.get(package, ()):
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_no_script_edits_sys_path_to_find_the_project():
    edits = []
    for module, tree in modules().items():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("insert", "append")
                and ast.unparse(node.func.value) == "sys.path"
            ):
                edits.append(f"{module}:{node.lineno}")
    assert edits == [], "run it as `python -m <module>` from the checkout's root instead"


def test_the_checks_see_a_circle_and_a_floor_broken():
    """The graph and the circle search on made-up modules: a -> b -> a is found, a lazy import counts."""
    a = ast.parse("def f():\n    from common.b import x\n")
    b = ast.parse("import common.a\n")
    edges = graph({"common.a": a, "common.b": b, "bench.c": ast.parse("from tests.fakes import y\n")})
    assert circles(edges) == [["common.a", "common.b"]]
    assert graph({"bench.c": ast.parse("from tests.fakes import y\n"), "tests.fakes": ast.parse("")})["bench.c"] == {
        "tests.fakes"
    }


def test_the_development_checklist_names_tests_that_exist():
    """docs/development.md's "Adding a method" names, for each step, the test that enforces it: each named test
    is a test function of the file it names, so the checklist cannot point at a test that was renamed away."""
    import re

    with open(os.path.join(ROOT, "docs", "development.md"), encoding="utf-8") as f:
        text = f.read()
    checklist = text[text.index("### Adding a method") :]
    named = re.findall(r"(tests/test_\w+\.py)::(test_\w+)", checklist)
    assert len(named) >= 7, named
    missing = []
    for path, test in named:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        if test not in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}:
            missing.append(f"{path}::{test}")
    assert missing == []


def test_the_checkout_tracks_no_link_and_no_environment():
    """A committed link (a worktree's `.venv` pointing at the main checkout's once was) replaces the real folder
    on merge and makes `make install` fail on a clean clone: nothing tracked is a symbolic link or under .venv."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    links = [line.split("\t", 1)[1] for line in listed.splitlines() if line.startswith("120000 ")]
    environment = [p for p in (line.split("\t", 1)[1] for line in listed.splitlines()) if p.split("/")[0] == ".venv"]
    assert not links, f"tracked symbolic links: {links} (git rm --cached them)"
    assert not environment, f"the environment is tracked: {environment[:5]} (git rm --cached -r .venv)"
