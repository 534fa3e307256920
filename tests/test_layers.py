"""docs/architecture.md's import rules, checked against the code: a change that breaks a layer or adds a cycle fails.

The document's first table says which of our folders each folder may import; its second says which third-party
packages only some files of a folder may import. Both are read from the document itself (so the document and the
test cannot drift), and every ``import`` and ``from ... import`` in every file is checked, lazy imports inside
functions included (``ast.walk`` sees them all).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import REPO  # noqa: E402

DOC = REPO / "docs" / "architecture.md"
FOLDERS = ("optimizers", "train", "ds_configs", "analysis", "benchmarks", "tests")


def table_rows(heading: str) -> list[list[str]]:
    """The cells of the markdown table under ``## heading`` (header and rule rows left out)."""
    text = DOC.read_text()
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, f"docs/architecture.md has no section '## {heading}'"
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in m.group(1).splitlines()
            if line.startswith("|")]
    return rows[2:]


def allowed_imports() -> dict[str, set[str]]:
    """folder -> the folders of ours it may import (besides itself), from the first table's third column."""
    out = {}
    for folder, _job, imports in table_rows("Folders, and what each may import"):
        name = folder.strip("`/")
        named = set(re.findall(r"`([a-z_]+)`", imports.split("(")[0]))
        out[name] = {n for n in named if n in FOLDERS}
    return out


def confined_packages() -> list[tuple[str, str, set[str]]]:
    """(third-party package, folder, the files of that folder that may import it), from the second table."""
    out = []
    for package, folder, files in table_rows("Third-party packages kept to a few files"):
        out.append((package.strip("`"), folder.strip("`/"), set(re.findall(r"`([\w./]+\.py)`", files))))
    return out


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file, lazy ones included; ``from a import b`` gives both
    ``a`` and ``a.b`` (b may be a module)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def python_files(root: Path = REPO) -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (root / folder).rglob("*.py"))


def layer_violations(allowed: dict[str, set[str]], files: list[Path], root: Path = REPO) -> list[str]:
    bad = []
    for path in files:
        folder = path.relative_to(root).parts[0]
        seen = set()
        for line, mod in imports_of(path):
            top = mod.split(".")[0]
            if (line, top) in seen:  # ``from a import b`` is one import, though both a and a.b are listed
                continue
            seen.add((line, top))
            if top in FOLDERS and top != folder and top not in allowed[folder]:
                bad.append(f"{path.relative_to(root)}:{line} imports {mod} ({folder}/ may import "
                           f"{', '.join(sorted(allowed[folder])) or 'none of ours'})")
    return bad


def cycles(files: list[Path], root: Path = REPO) -> list[list[str]]:
    """The strongly connected components of more than one module in the graph of our modules' imports."""
    mods = {module_name(p, root): p for p in files}
    graph = {m: {d for _, d in imports_of(p) if d in mods and d != m} for m, p in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
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
                out.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return out


def test_the_document_names_every_folder_and_only_folders_that_exist():
    allowed = allowed_imports()
    assert set(allowed) == set(FOLDERS), f"docs/architecture.md's table lists {sorted(allowed)}, not {FOLDERS}"
    assert all((REPO / f).is_dir() for f in allowed)
    # the layers form no cycle themselves: optimizers < train < benchmarks/tests, as the document says
    for a, deps in allowed.items():
        for b in deps:
            assert a not in allowed[b], f"the table lets {a}/ and {b}/ import each other"


def test_every_import_keeps_to_its_folders_layer():
    bad = layer_violations(allowed_imports(), python_files())
    assert not bad, "imports that docs/architecture.md does not allow:\n" + "\n".join(bad)


def test_no_import_cycle_between_our_modules():
    found = cycles(python_files())
    assert not found, f"import cycles (lazy imports included): {found}"


def test_third_party_packages_stay_in_the_files_the_document_names():
    rules = confined_packages()
    assert rules, "the second table of docs/architecture.md is empty"
    bad = []
    for package, folder, files in rules:
        for f in files:
            assert (REPO / folder / f).is_file(), f"docs/architecture.md names {folder}/{f}, which does not exist"
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.relative_to(REPO / folder).as_posix() in files:
                continue
            bad += [f"{path.relative_to(REPO)}:{line} imports {mod}" for line, mod in imports_of(path)
                    if mod.split(".")[0] == package]
    assert not bad, "third-party imports outside the files docs/architecture.md names:\n" + "\n".join(bad)


@pytest.mark.parametrize("kind", ["layer", "cycle"])
def test_the_checks_catch_what_they_guard(tmp_path, kind):
    """The control: an import from optimizers/ into train/ (lazy), or two modules importing each other, is found."""
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
    if kind == "layer":
        (tmp_path / "optimizers" / "sgd.py").write_text("def f():\n    from train.engine import build_engine\n")
        bad = layer_violations(allowed_imports(), python_files(tmp_path), tmp_path)
        assert len(bad) == 1 and bad[0].startswith("optimizers/sgd.py:2 imports train.engine"), bad
    else:
        (tmp_path / "analysis" / "a.py").write_text("from analysis import b\n")
        (tmp_path / "analysis" / "b.py").write_text("def f():\n    import analysis.a\n")
        assert cycles(python_files(tmp_path), tmp_path) == [["analysis.a", "analysis.b"]]
