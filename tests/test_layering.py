"""Only the Lightning-facing modules import lightning (STYLE.md): the math, models, rollout and rewards stay pure."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_rlhf"
LIGHTNING_FACING = {
    "module.py",
    "data.py",
    "cli.py",
    "callbacks.py",
    "strategies.py",
    "precision.py",
    "sft.py",
    "reward_model.py",
    "pipeline_data.py",
    "export_callback.py",
    "checkpointing.py",
}
LIGHTNING_NAMES = {"lightning", "pytorch_lightning", "lightning_fabric"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


PURE_MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.name not in LIGHTNING_FACING)


def test_pure_modules_exist():
    names = {p.name for p in PURE_MODULES}
    assert {"functional.py", "types.py", "control.py"} <= names


@pytest.mark.parametrize("path", PURE_MODULES, ids=lambda p: p.name)
def test_pure_module_does_not_import_lightning(path):
    assert not imported_roots(path) & LIGHTNING_NAMES, f"{path.name} imports lightning; move that code to module.py"


def test_checker_sees_lightning_imports():
    assert "lightning" in imported_roots(PACKAGE / "module.py")


def test_functional_imports_only_torch_and_types():
    allowed = {"__future__", "math", "typing", "torch", "lightning_rlhf"}
    assert imported_roots(PACKAGE / "functional.py") <= allowed
