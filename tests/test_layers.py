"""Import layering: ``storage`` is the bottom, ``model`` and ``components`` never reach up into the
server (``serving``) or the pipeline definitions (``pipelines``), and steps do not use ``services``.

Every ``.py`` under the checked packages is parsed with :mod:`ast`; imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# (package, forbidden top-level packages, modules allowed despite that)
RULES: dict[str, tuple[set[str], set[str]]] = {
    "storage": ({"model", "components", "pipelines", "serving", "services"}, {"model.errors"}),
    "model": ({"serving", "pipelines"}, set()),
    "components": ({"serving", "pipelines", "services"}, set()),
}

# Known violations in files being rewritten elsewhere: (file, imported module) pairs.
ALLOWED: set[tuple[str, str]] = set()


def imported_modules(path: Path) -> set[str]:
    """The absolute names a file imports: ``import a.b`` -> ``a.b``, ``from a.b import c`` ->
    ``a.b.c`` (so ``from model import errors`` and ``from model.errors import X`` both fall under
    ``model.errors``). Relative imports stay inside the package and are skipped."""
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
        "import os\nimport model\nfrom model import errors\nfrom .x import y\n\n"
        "def f():\n    from serving.fetch import fetch_s3\n"
    )
    assert imported_modules(sample) == {"os", "model", "model.errors", "serving.fetch.fetch_s3"}
    assert not any(_under(m, "model.errors") for m in ["model", "model.errorsx"])
