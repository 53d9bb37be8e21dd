"""How the package's modules find each other: kinds hold layer classes and share maths only
through linalg/ and _checks.py; the core never imports cirkit or the adapters."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import structlayers

PACKAGE = Path(structlayers.__file__).resolve().parent
KINDS_DIR = PACKAGE / "kinds"
KIND_MODULES = {p.stem for p in KINDS_DIR.glob("*.py")} - {"__init__"}


def _relative_imports(path: Path):
    """(module the import names, imported names) for every ``from .x import ...`` in a file."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            yield node.level, node.module or "", [alias.name for alias in node.names]


def test_a_kind_imports_no_other_kind_but_the_shared_base_class():
    for path in KINDS_DIR.glob("*.py"):
        if path.stem == "__init__":
            continue
        for level, module, _ in _relative_imports(path):
            if level == 1:  # a sibling in kinds/: only the shared base classes
                assert module in ("_factored", "_network"), f"{path.name} imports kinds.{module}"


def test_no_module_imports_private_names_of_a_kind():
    for path in PACKAGE.rglob("*.py"):
        for level, module, names in _relative_imports(path):
            target = module.split(".")[-1]
            if target in KIND_MODULES and target not in ("_factored", "_network"):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{path.relative_to(PACKAGE)} imports {private} from {module}"


def test_linalg_imports_no_layer_code():
    for path in (PACKAGE / "linalg").glob("*.py"):
        for level, module, _ in _relative_imports(path):
            if level == 2:  # structlayers.<module>: only leaf helpers that import no layer code
                assert module in ("_checks", "gradients"), f"linalg/{path.name} imports structlayers.{module}"


def test_every_core_module_imports_with_cirkit_and_the_adapters_blocked():
    names = ["structlayers"] + [m.name for m in pkgutil.walk_packages([str(PACKAGE)], "structlayers.")
                                if m.name != "structlayers.__main__"]
    code = ("import importlib, sys\n"
            "for blocked in ('cirkit', 'adapters'):\n"
            "    sys.modules[blocked] = None\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print(len(sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(names) > 20  # the walk found the subpackages
