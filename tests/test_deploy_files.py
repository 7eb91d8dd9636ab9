"""The deployment files (docker-compose.yml, docker/Dockerfile.*) hold together: no Docker engine is needed to check
that services build from files that exist, use only settings kmserve reads, and keep secrets out of the images."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from registry.config import env_names

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
KMSERVE_NAME = re.compile(r"\bKMSERVE_[A-Z0-9_]+\b")
SECRET_ENV = re.compile(r"^\s*ENV\b.*(KEY|PASSWORD|SECRET|TOKEN)", re.IGNORECASE | re.MULTILINE)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]  # type: ignore[no-any-return]


def instructions(dockerfile: Path, keyword: str) -> list[str]:
    """The arguments of every `keyword` instruction, continuation lines joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in text.splitlines() if line.split(None, 1)[:1] == [keyword]]


def test_all_three_dockerfiles_exist() -> None:
    assert {path.name for path in DOCKERFILES} >= {"Dockerfile.server", "Dockerfile.worker", "Dockerfile.cpu"}


def test_every_service_has_an_image_or_a_build_whose_dockerfile_exists(services: dict[str, Any]) -> None:
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            context = ROOT / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).is_file(), name


def test_images_are_pinned(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if "image" in service:
            assert ":" in service["image"] and not service["image"].endswith(":latest"), name


def test_named_volumes_are_declared_at_top_level(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = {mount.split(":", 1)[0] for service in services.values() for mount in service.get("volumes", [])}
    named = {source for source in used if not source.startswith((".", "/", "~", "$"))}
    assert named and named <= declared


def test_every_kmserve_variable_is_a_settings_field() -> None:
    texts = [COMPOSE.read_text(), *(path.read_text() for path in DOCKERFILES)]
    used = {name for text in texts for name in KMSERVE_NAME.findall(text)}
    assert used, "the deployment files should configure kmserve through KMSERVE_* variables"
    assert used <= env_names(), f"not read by Settings: {sorted(used - env_names())}"


def test_env_names_follow_the_settings_prefix() -> None:
    from registry.config import Settings

    prefix = Settings.model_config["env_prefix"]
    assert {f"{prefix}{field.upper()}" for field in Settings.model_fields} == env_names()


@pytest.mark.parametrize("name", ["postgres", "qdrant", "server"])
def test_stateful_and_serving_services_have_healthchecks(services: dict[str, Any], name: str) -> None:
    assert services[name]["healthcheck"]["test"]


def test_server_waits_for_healthy_backends_and_migrates(services: dict[str, Any]) -> None:
    server = services["server"]
    assert server["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                    "qdrant": {"condition": "service_healthy"}}
    assert "kmserve migrate && kmserve serve" in " ".join(server["command"])


@pytest.mark.parametrize("name", ["server", "worker"])
def test_gpu_services_reserve_a_gpu(services: dict[str, Any], name: str) -> None:
    devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] for device in devices)


def test_worker_can_scale(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert worker["command"] == ["kmserve", "worker"]


def test_server_and_worker_share_the_adapter_store(services: dict[str, Any]) -> None:
    for name in ("server", "worker"):
        assert "adapters:/adapters" in services[name]["volumes"], name
        assert services[name]["environment"]["KMSERVE_STORE_URL"] == "/adapters", name


def test_compose_secrets_come_from_the_environment(services: dict[str, Any]) -> None:
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    url = services["server"]["environment"]["KMSERVE_DATABASE_URL"]
    assert url.startswith("postgresql+psycopg://") and "${POSTGRES_PASSWORD" in url


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_runs_as_non_root_with_a_healthcheck(dockerfile: Path) -> None:
    users = instructions(dockerfile, "USER")
    assert users and users[-1].strip() not in ("root", "0")
    assert instructions(dockerfile, "HEALTHCHECK")
    assert "KMSERVE_DATA_DIR=/data" in " ".join(instructions(dockerfile, "ENV"))
    assert '"/data"' in " ".join(instructions(dockerfile, "VOLUME"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_bakes_in_no_secret(dockerfile: Path) -> None:
    assert not SECRET_ENV.search(dockerfile.read_text().replace("\\\n", " "))


def test_cpu_image_installs_cpu_torch_before_the_project() -> None:
    runs = instructions(ROOT / "docker" / "Dockerfile.cpu", "RUN")
    torch_step = next(i for i, run in enumerate(runs) if "torch==2.13.0" in run)
    project_step = next(i for i, run in enumerate(runs) if re.search(r"pip install .*\s\.$", run.strip()))
    assert torch_step < project_step
    assert "download.pytorch.org/whl/cpu" in runs[torch_step] and "constraints.txt" in runs[torch_step]


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".kmserve", ".git", "bench/results/tmp", ".pytest_cache", ".env"} <= ignored
