"""Import layering: ``common`` (errors, logs, the CLI runner, config files) is the bottom, then
``storage``; ``model`` never reaches up into ``components``; ``model`` and ``components`` never reach
up into the server (``serving``) or the pipeline definitions (``pipelines``), and steps do not use
``services``. No module-level import circle exists among the project's modules.

Every ``.py`` under the checked packages is parsed with :mod:`ast`; imports inside functions count too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# (package, forbidden top-level packages, modules allowed despite that)
RULES: dict[str, tuple[set[str], set[str]]] = {
    "common": ({"storage", "model", "components", "pipelines", "serving", "services", "data_tools"}, set()),
    "storage": ({"model", "components", "pipelines", "serving", "services", "data_tools"}, set()),
    "model": ({"components", "serving", "pipelines", "services"}, set()),
    "components": ({"serving", "pipelines", "services"}, set()),
}

# Known violations in files being rewritten elsewhere: (file, imported module) pairs.
ALLOWED: set[tuple[str, str]] = set()


def imported_modules(path: Path) -> set[str]:
    """The absolute names a file imports: ``import a.b`` -> ``a.b``, ``from a.b import c`` ->
    ``a.b.c`` (so ``from common import errors`` and ``from common.errors import X`` both fall under
    ``common.errors``). Relative imports stay inside the package and are skipped."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(
                node.module if alias.name == "*" else f"{node.module}.{alias.name}" for alias in node.names
            )
    return found


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(f"{prefix}.")


def violations(package: str) -> list[tuple[str, str]]:
    """(file, imported name) pairs of ``package`` that break its rule, allowlisted ones included."""
    forbidden, exceptions = RULES[package]
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for module in sorted(imported_modules(path)):
            if module.split(".")[0] in forbidden and not any(_under(module, ok) for ok in exceptions):
                found.append((rel, module))
    return found


def _allowlisted(rel: str, module: str) -> bool:
    return any(rel == file and _under(module, allowed) for file, allowed in ALLOWED)


@pytest.mark.parametrize("package", sorted(RULES))
def test_layering(package):
    bad = [(rel, mod) for rel, mod in violations(package) if not _allowlisted(rel, mod)]
    assert not bad, f"{package}/ imports across layers: " + ", ".join(f"{r} -> {m}" for r, m in bad)


def test_allowlist_is_not_stale():
    """Every allowlisted import still exists: drop the entry once the rewrite removes it."""
    found = [v for package in RULES for v in violations(package)]
    stale = sorted((file, allowed) for file, allowed in ALLOWED
                   if not any(rel == file and _under(mod, allowed) for rel, mod in found))  # fmt: skip
    assert not stale, f"allowlisted imports no longer present, remove them from ALLOWED: {stale}"


def test_the_checker_sees_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nimport model\nfrom common import errors\nfrom .x import y\n\n"
        "def f():\n    from serving.fetch import fetch_s3\n"
    )
    assert imported_modules(sample) == {"os", "model", "common.errors", "serving.fetch.fetch_s3"}
    assert not any(_under(m, "common.errors") for m in ["common", "common.errorsx"])


PACKAGES = (
    "common", "storage", "model", "components", "pipelines", "serving", "services", "data_tools", "bench",
)  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports when it is loaded: module-level statements only (imports
    inside functions run later and cannot form a load-time circle; ``if TYPE_CHECKING`` blocks never
    run). ``from a.b import c`` names the module ``a.b.c`` when that is one, else ``a.b``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]  # fmt: skip
        else:
            continue
        found.update(n for n in names if n in known)
    return found


def import_cycles() -> list[list[str]]:
    """Strongly connected groups (size > 1, or a self-import) of the project's load-time import graph."""
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    known = set(files)
    graph = {m: top_level_imports(p, known) for m, p in files.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph[node]:
                cycles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_circle(tmp_path, monkeypatch):
    pkg = tmp_path / "common"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from common.b import x\n")
    (pkg / "b.py").write_text("import os\n\nfrom common import a\n\ndef f():\n    import common.a\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert import_cycles() == [["common.a", "common.b"]]
