"""The README's module map is the code's: every module is listed, and imports only what its row allows."""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO

PACKAGE = REPO / "service" / "echo_scp"


def _map() -> dict[str, set[str]]:
    """module -> the echo_scp modules its README row allows it to import."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("| module | job | may import (echo_scp) | third-party |") :].split("\n\n", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        module = cells[0].strip("`").removesuffix(".py")
        rows[module] = set(re.findall(r"`([a-z_]+)`", cells[2]))
    return rows


def _imports(module: str) -> set[str]:
    """The echo_scp modules a module imports, anywhere in it (lazy and type-only imports included)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module == "echo_scp":
                found |= {"__init__" if alias.name == "__version__" else alias.name for alias in node.names}
            elif node.module.startswith("echo_scp."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("echo_scp.")}
    return found - {module}


def test_every_module_is_in_the_map() -> None:
    """The map lists exactly the package's modules."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert set(_map()) == modules


def test_imports_follow_the_map() -> None:
    """No module imports a package module its row does not allow."""
    allowed = _map()
    extra = {module: sorted(_imports(module) - allowed[module]) for module in allowed}
    assert {module: names for module, names in extra.items() if names} == {}
