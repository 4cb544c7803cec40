"""The shape of the code base: imports between top-level packages run one way, files stay small.

    ingest  <-  encoder  <-  recommender        ui -> ingest only (it talks to the recommender over HTTP)

`encoder` is a pure ML library: from the app it imports only `ingest.catalog` (the bundled dataset,
for its training and evaluation CLIs), never `ingest.settings` or `recommender`. bench/ and tests/
may import anything. Every import counts, including those inside functions.

    pytest tests/test_layout.py
"""

from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

from ingest.settings import REPO_ROOT

PACKAGES = ("ingest", "encoder", "recommender", "ui")
MAY_IMPORT = {
    "ingest": (),
    "encoder": ("ingest.catalog",),
    "recommender": ("ingest", "encoder"),
    "ui": ("ingest",),
}
# Imports that a branch being merged at the same time removes ("native": the kernel reads its own
# settings). Each must still be there, so that this list cannot go stale: delete an entry when its
# branch lands, then this test holds the line.
PENDING_IMPORTS = {("encoder/kernel/__init__.py", "ingest.settings.Settings")}

MAX_LINES = 450
SOURCE_SUFFIXES = {".py", ".c", ".h", ".md", ".toml", ".yml", ".yaml", ".sh", ".xml"}
SOURCE_NAMES = {"Makefile", "Dockerfile", "run"}
# Data, not code: the dataset, the model, benchmark output (reports/*.json and BENCHMARKS.md).
NOT_SOURCE = ("ingest/data/", "models/", "reports/", "BENCHMARKS.md")
SKIPPED_DIRS = {".venv", ".git", ".pytest_cache", ".ruff_cache", "__pycache__", "build", "runs", "checkpoints"}
# Files another branch being merged at the same time splits ("native"); each must still be too long.
PENDING_SPLITS = {"encoder/ternary_model.py", "bench/speed.py"}


def imported_modules(path: Path, root: Path = REPO_ROOT) -> list[str]:
    """Every module `path` imports, as dotted names (`from a.b import c` gives `a.b.c`)."""
    package = path.relative_to(root).parent.as_posix().replace("/", ".")
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: within the package, resolved against it
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def package_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO_ROOT / pkg).rglob("*.py"))


def crossing_imports() -> set[tuple[str, str]]:
    """(file, imported name) of every import from one top-level package into another."""
    found = set()
    for path in package_modules():
        own = path.relative_to(REPO_ROOT).parts[0]
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top in PACKAGES and top != own:
                found.add((path.relative_to(REPO_ROOT).as_posix(), name))
    return found


def allowed(file: str, name: str) -> bool:
    own = file.split("/")[0]
    return any(name == ok or name.startswith(ok + ".") for ok in MAY_IMPORT[own])


def test_imports_between_packages_run_one_way():
    crossing = crossing_imports()
    wrong = sorted(f"{file} imports {name}" for file, name in crossing
                   if not allowed(file, name) and (file, name) not in PENDING_IMPORTS)
    assert not wrong, "imports against the package direction:\n" + "\n".join(wrong)
    stale = PENDING_IMPORTS - crossing
    assert not stale, f"no longer imported, remove from PENDING_IMPORTS: {sorted(stale)}"


def test_no_import_cycle_between_packages():
    edges = {pkg: set() for pkg in PACKAGES}
    for file, name in crossing_imports():
        edges[file.split("/")[0]].add(name.split(".")[0])

    def cycle_from(start: str, path: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in sorted(edges[path[-1]]):
            if nxt == start:
                return (*path, nxt)
            if nxt not in path and (found := cycle_from(start, (*path, nxt))):
                return found
        return None

    cycles = [" -> ".join(c) for pkg in PACKAGES if (c := cycle_from(pkg, (pkg,)))]
    assert not cycles, f"import cycles between top-level packages: {cycles}"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    module = tmp_path / "encoder" / "sub" / "m.py"
    module.parent.mkdir(parents=True)
    module.write_text("from . import sibling\nimport numpy\n\ndef f():\n    from recommender.store import Store\n")
    assert imported_modules(module, root=tmp_path) == ["encoder.sub.sibling", "numpy", "recommender.store.Store"]
    assert not allowed("encoder/sub/m.py", "recommender.store.Store")
    assert allowed("encoder/evaluate.py", "ingest.catalog.load_items")
    assert not allowed("encoder/kernel/__init__.py", "ingest.settings.Settings")


def source_files() -> list[Path]:
    out = []
    for folder, dirs, files in os.walk(REPO_ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        for name in files:
            path = Path(folder, name)
            if path.relative_to(REPO_ROOT).as_posix().startswith(NOT_SOURCE):
                continue
            if path.suffix in SOURCE_SUFFIXES or name in SOURCE_NAMES:
                out.append(path)
    return out


def test_no_source_file_is_longer_than_450_lines():
    lengths = {p.relative_to(REPO_ROOT).as_posix(): len(p.read_text(errors="replace").splitlines())
               for p in source_files()}
    assert "recommender/worker.py" in lengths and "encoder/kernel/tq2k_ref.c" in lengths  # it looks where it should
    too_long = {f: n for f, n in lengths.items() if n > MAX_LINES and f not in PENDING_SPLITS}
    assert not too_long, f"over {MAX_LINES} lines, split by concept: {too_long}"
    stale = {f for f in PENDING_SPLITS if lengths.get(f, 0) <= MAX_LINES}
    assert not stale, f"split already, remove from PENDING_SPLITS: {sorted(stale)}"


def test_the_readme_layout_names_every_top_level_folder():
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    named = {line.split()[0].rstrip("/") for line in block.splitlines() if line and not line[0].isspace()}
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True)
    if tracked.returncode == 0:  # the folders of the repository, not local caches or outputs
        folders = {f.split("/")[0] for f in tracked.stdout.splitlines() if "/" in f}
    else:
        folders = {p.name for p in REPO_ROOT.iterdir()
                   if p.is_dir() and p.name not in SKIPPED_DIRS and not p.name.endswith(".egg-info")}
    assert named == folders
