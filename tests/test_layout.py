"""Layout rules (docs/design.md, "Package layout"), read from the source with
``ast``: nothing imports a module it is not told to."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "statestore"
#: The one module that may import the service: ``statestore serve`` starts it.
SERVICE_STARTER = PACKAGE / "cli.py"
#: Flat modules of statestore/ that moved to maintenance/, local/ or the service.
OLD_FLAT_MODULES = {
    "compactor",
    "embedded",
    "etcd_server",
    "faultproxy",
    "gc",
    "maintenance",
    "namespace",
    "reconciler",
    "sessions",
}


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports, at any depth (lazy imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_only_the_cli_imports_the_service() -> None:
    assert "statestore_api.settings" in imported_modules(SERVICE_STARTER)  # the scan sees it
    offenders = {
        str(path.relative_to(PACKAGE.parent)): sorted(
            name for name in imported_modules(path) if name.split(".")[0] == "statestore_api"
        )
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != SERVICE_STARTER
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_no_module_keeps_an_old_flat_name() -> None:
    left = sorted(p.name for p in PACKAGE.glob("*.py") if p.stem in OLD_FLAT_MODULES)
    assert left == []
