"""The package's layers (pyproject.toml, [tool.importlinter]; DESIGN.md): no module imports from a
layer above its own, the stages do not import each other, and there is no import cycle."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_import_linter_contracts_hold():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    out = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken." in out.stdout


def test_every_subpackage_is_in_a_layer():
    """A new subpackage or top-level module must be placed in the layers, or it escapes the check."""
    import tomllib

    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    placed = {name.strip() for layer in layers for name in layer.replace(":", "|").split("|")}
    modules = {p.stem for p in (ROOT / "raywsl").glob("*.py") if p.stem != "__init__"}
    packages = {p.parent.name for p in (ROOT / "raywsl").glob("*/__init__.py")}
    assert modules | packages == placed, (modules | packages) ^ placed
