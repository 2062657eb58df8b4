"""The import graph the architecture promises (docs/architecture.md): ``service`` and
``training`` side by side above ``cprec`` and ``model_store``, no arrow between the two, and
neither of the bottom two importing anything of the project above it or each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cprec", "model_store", "service", "training", "bench")
ALLOWED = {
    "cprec": set(),
    "model_store": set(),
    "service": {"cprec", "model_store"},
    "training": {"cprec", "model_store"},
}


def imports_of(package: str) -> dict[str, set[str]]:
    """Each module of ``package`` -> the project packages it imports (at any depth)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = {n for n in names if n in PACKAGES} - {package}
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_layers(package: str) -> None:
    bad = {m: sorted(n - ALLOWED[package]) for m, n in imports_of(package).items()}
    assert not {m: n for m, n in bad.items() if n}, f"{package} imports outside its layer"


def test_importing_cprec_changes_nothing() -> None:
    """The runtime variables are set by an explicit call, never as an import side effect."""
    source = (ROOT / "cprec" / "__init__.py").read_text(encoding="utf-8")
    assert "os.environ" not in source and "import os" not in source
