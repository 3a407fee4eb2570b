"""The package's layering (STYLE.md), checked over every file of the tree: only the Lightning-facing modules import
lightning, the pure math imports only torch and itself, and no private name crosses a module boundary (in the package,
the benchmarks or the scripts)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lightning_rlhf"
LIGHTNING_FACING = {
    "module.py",
    "cli.py",
    "strategies.py",
    "precision.py",
    "sft.py",
    "reward_model.py",
    "checkpointing.py",
    "data/prompts.py",
    "data/examples.py",
    "data/preferences.py",
    "callbacks/hooks.py",
    "callbacks/alarms.py",
    "callbacks/samples.py",
    "callbacks/artifacts.py",
}
"""LightningModules, DataModules, callbacks, strategies and the CLI: the only files that may import lightning."""
LIGHTNING_NAMES = {"lightning", "pytorch_lightning", "lightning_fabric"}
SOURCES = sorted(PACKAGE.rglob("*.py"))
BENCHMARK_SOURCES = sorted((REPO / "benchmarks").glob("*.py")) + sorted((REPO / "scripts").glob("*.py"))


def relative(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def imports(path: Path) -> list[ast.Import | ast.ImportFrom]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in imports(path):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


PURE = [p for p in SOURCES if relative(p) not in LIGHTNING_FACING]


def test_the_tree_is_globbed():
    names = {relative(p) for p in SOURCES}
    assert {"functional/ppo.py", "models/policy.py", "types.py", "control.py"} <= names
    assert names >= LIGHTNING_FACING, sorted(LIGHTNING_FACING - names)


@pytest.mark.parametrize("path", PURE, ids=relative)
def test_pure_module_does_not_import_lightning(path):
    assert not imported_roots(path) & LIGHTNING_NAMES, f"{relative(path)} imports lightning; move that code out"


def test_checker_sees_lightning_imports():
    assert "lightning" in imported_roots(PACKAGE / "module.py")


@pytest.mark.parametrize("path", sorted((PACKAGE / "functional").glob("*.py")), ids=relative)
def test_functional_imports_only_torch_and_types(path):
    allowed = {"__future__", "math", "typing", "torch", "lightning_rlhf"}
    assert imported_roots(path) <= allowed
    internal = {
        n.module
        for n in imports(path)
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("lightning_rlhf.")
    }
    assert all(m.startswith(("lightning_rlhf.functional", "lightning_rlhf.types")) for m in internal), internal


def private_imports(path: Path) -> list[str]:
    """``module.name`` for every private name ``path`` imports from a lightning_rlhf module."""
    found = []
    for node in imports(path):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_rlhf"):
            found += [
                f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"
            ]
    return found


@pytest.mark.parametrize("path", SOURCES + BENCHMARK_SOURCES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_private_name_is_imported_from_another_module(path):
    assert not private_imports(path), f"make these public where they live, or move them: {private_imports(path)}"


def test_the_private_name_check_sees_one(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("from lightning_rlhf.models.loading import _pretrained\n")
    assert private_imports(source) == ["lightning_rlhf.models.loading._pretrained"]


SERVER = "serve/"
"""The reward server: the only files that may import the ASGI stack (the ``serve`` extra); nothing else imports
them, so training runs without it."""
SERVER_NAMES = {"fastapi", "starlette", "uvicorn"}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, and ``module.name`` for every name it imports from one."""
    found = {a.name for n in imports(path) if isinstance(n, ast.Import) for a in n.names}
    found |= {n.module for n in imports(path) if isinstance(n, ast.ImportFrom) and n.module}
    return found | {f"{n.module}.{a.name}" for n in imports(path) if isinstance(n, ast.ImportFrom) for a in n.names}


@pytest.mark.parametrize("path", [p for p in SOURCES if not relative(p).startswith(SERVER)], ids=relative)
def test_only_the_server_imports_the_asgi_stack_and_nothing_imports_the_server(path):
    assert not imported_roots(path) & SERVER_NAMES, f"{relative(path)} imports the server's optional dependencies"
    server = sorted(m for m in imported_modules(path) if m.split(".")[:2] == ["lightning_rlhf", "serve"])
    assert not server, f"{relative(path)} imports {server}, which need fastapi"


def test_the_server_check_sees_the_server_imports():
    assert {"fastapi", "uvicorn"} <= imported_roots(PACKAGE / "serve" / "__init__.py")
    assert "lightning_rlhf.serve.app.create_app" in imported_modules(PACKAGE / "serve" / "__init__.py")
