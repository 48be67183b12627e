"""The layering of ARCHITECTURE.md stays true: imports point down, every module has a layer, and the
contract in pyproject.toml says what the page's table says. Tests share fixtures through conftest.py,
never by importing another test module."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOT_PACKAGES = ("core", "cache", "models", "dashboard")
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _layers_contract() -> dict:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    assert tuple(config["root_packages"]) == ROOT_PACKAGES
    return next(contract for contract in config["contracts"] if contract["type"] == "layers")


def _contract_layers() -> list[set[str]]:
    """The contract's layers, top first, as sets of module names (optional ones unwrapped)."""
    return [{name.strip().strip("()") for name in re.split(r"[:|]", layer)} for layer in _layers_contract()["layers"]]


def _table_layers() -> list[set[str]]:
    """ARCHITECTURE.md's table, top first: the modules column of each row, less a "(but ...)" part."""
    layers = []
    lines = (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8").splitlines()
    rows = [line for line in lines if line.startswith("|")]
    for row in rows[2:]:  # header and rule
        modules = row.split("|")[2].split("(but")[0]
        layers.append(set(re.findall(r"`([\w.]+)`", modules)))
    return layers


def _modules() -> set[str]:
    """Every module of the four packages, from the files (dashboard/views/ has no __init__.py)."""
    found = set()
    for package in ROOT_PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def _layer_of(module: str, layers: list[set[str]]) -> int | None:
    """Index of the layer of the longest listed name that is the module or a package above it."""
    best: tuple[int, int] | None = None
    for index, names in enumerate(layers):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[0]):
                best = (len(name), index)
    return None if best is None else best[1]


def test_imports_point_down():
    """import-linter's contracts in pyproject.toml are kept: no module imports a layer above its own."""
    run = subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[run.stdout.find("Contracts") :] + run.stderr


def test_every_module_has_a_layer():
    """A module in no layer would escape the contract; the root packages' __init__ hold no imports."""
    layers = _contract_layers()
    roots_outside = {m for m in ROOT_PACKAGES if _layer_of(m, layers) is None}
    homeless = sorted(m for m in _modules() - roots_outside if _layer_of(m, layers) is None)
    assert not homeless, f"modules in no layer of pyproject.toml's contract (and of ARCHITECTURE.md): {homeless}"
    for root in roots_outside:
        tree = ast.parse((REPO / root / "__init__.py").read_text(encoding="utf-8"))
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)], f"{root}/__init__.py"


def test_every_layer_module_exists():
    """Names in parentheses are optional to import-linter; once the refactor is done none is missing."""
    missing = sorted(name for layer in _contract_layers() for name in layer if name not in _modules())
    assert not missing, f"modules named in the layers contract that do not exist: {missing}"


def test_contract_is_the_architecture_table():
    """pyproject.toml's contract and ARCHITECTURE.md's table put every module in the same layer."""
    table, contract = _table_layers(), _contract_layers()
    assert len(table) == len(contract) == 7
    names = _modules() | set().union(*table, *contract)
    differ = {
        name: (_layer_of(name, table), _layer_of(name, contract))
        for name in sorted(names - set(ROOT_PACKAGES))
        if _layer_of(name, table) != _layer_of(name, contract)
    }
    assert not differ, f"module: (layer in ARCHITECTURE.md, layer in pyproject.toml), 0 = top: {differ}"


def _imported_modules(tree: ast.Module, package: str) -> set[str]:
    """Absolute names a module of ``package`` imports (relative imports resolved)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parent = package.rsplit(".", node.level - 1)[0] if node.level else ""
            base = ".".join(part for part in (parent, node.module or "") if part) if node.level else (node.module or "")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _test_modules() -> dict[str, Path]:
    return {".".join(path.relative_to(REPO).with_suffix("").parts): path for path in (REPO / "tests").rglob("*.py")}


def test_no_test_module_imports_another():
    """Shared fixtures and helpers live in conftest.py or a helper module, never in a test module."""
    modules = _test_modules()
    test_modules = {name for name in modules if name.rsplit(".", 1)[-1].startswith("test_")}
    offenders = {}
    for name, path in sorted(modules.items()):
        imported = _imported_modules(ast.parse(path.read_text(encoding="utf-8")), name.rsplit(".", 1)[0])
        wrong = sorted(imported & test_modules - {name})
        if wrong:
            offenders[name] = wrong
    assert not offenders, f"test modules importing test modules: {offenders}"


def test_tests_mirror_the_packages():
    """tests/<package>/ holds the tests of one top-level package; only cross-package checks sit at the top."""
    folders = {path.name for path in (REPO / "tests").iterdir() if path.is_dir() and path.name != "__pycache__"}
    assert folders <= set(ROOT_PACKAGES), folders
    top = {path.name for path in (REPO / "tests").glob("test_*.py")}
    assert top == {"test_architecture.py"}, top
