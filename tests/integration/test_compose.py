"""docker-compose.yml and the Dockerfile, checked with what runs here (no container engine on this machine kind).

The file is parsed and its structure checked; every service's command is resolved against the package
(segq sub-commands and their options through click, the Celery app path and Flower's sub-command), and
no password has a default. When a compose client is installed (`docker compose` or `docker-compose`),
`config` must accept the file with the secrets set and refuse it without them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from tests.helpers import ROOT

COMPOSE = ROOT / "docker-compose.yml"
SECRETS = {"SEGQ_REDIS_PASSWORD": "r3dis", "SEGQ_POSTGRES_PASSWORD": "p0stgres", "SEGQ_FLOWER_AUTH": "admin:fl0wer"}
SEGQ_SERVICES = ("migrate", "coordinator", "gpu", "flower")
VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict) and "services" in document
    return document


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with the defaults, ${VAR:?message} with a stand-in value."""
    return VARIABLE.sub(lambda m: m.group(3) if m.group(2) and m.group(2).endswith("-") else "x", value)


def command_of(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    assert isinstance(command, list), "exec form, so the launcher gets the signals itself"
    return [interpolate(str(part)) for part in command]


def check_segq_command(args: list[str]) -> None:
    """Resolve ``segq <sub> [<sub>] options`` through the real click commands, refusing unknown options
    (``segq worker`` passes unknown options on to Celery, so a typo there would pass silently)."""
    from segq.cli import cli

    assert args[0] == "segq", args
    command: click.Command = cli
    rest = args[1:]
    ctx = click.Context(cli, info_name="segq")
    while isinstance(command, click.Group):
        found = command.get_command(ctx, rest[0])
        assert found is not None, f"segq has no sub-command {rest[0]!r} ({args})"
        command, rest = found, rest[1:]
    declared = {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]}
    unknown = [token.split("=")[0] for token in rest if token.startswith("-") and token.split("=")[0] not in declared]
    assert not unknown, f"{' '.join(args)}: options {unknown} are not options of this command"
    command.make_context(command.name or "", list(rest), parent=ctx)  # checks types, choices and ranges


def test_services_and_their_commands_exist_in_the_package(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "postgres", "migrate", "coordinator", "gpu", "flower"} <= set(services)
    for name, service in services.items():
        if "command" not in service or service.get("image", "").startswith(("redis:", "postgres:")):
            continue
        args = command_of(service)
        if args[0] == "segq":
            check_segq_command(args)
        else:
            assert args[:3] == ["celery", "-A", "segq.celery_app"], (name, args)
            import importlib

            from celery import Celery

            assert isinstance(importlib.import_module("segq.celery_app").app, Celery)
            help_text = subprocess.run([sys.executable, "-m", *args[:4], "--help"], capture_output=True, text=True,
                                       cwd=ROOT, timeout=60)
            assert help_text.returncode == 0, help_text.stderr
    assert command_of(services["migrate"]) == ["segq", "db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    assert command_of(services["coordinator"])[:4] == ["segq", "worker", "--role", "coordinator"]
    assert command_of(services["gpu"])[:4] == ["segq", "worker", "--gpus", "all"]


def test_redis_postgres_and_flower_settings(compose: dict[str, Any]) -> None:
    services = compose["services"]
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis
    assert "--requirepass ${SEGQ_REDIS_PASSWORD:?" in redis
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${SEGQ_POSTGRES_PASSWORD:?")
    flower = services["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${SEGQ_FLOWER_AUTH:?")
    assert "--port=5555" in flower["command"] and any(str(p).endswith(":5555") for p in flower["ports"])
    devices = services["gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    for name in ("coordinator", "gpu"):
        after = services[name]["depends_on"]
        assert after["migrate"]["condition"] == "service_completed_successfully", name
        assert services[name]["init"] is True and services[name]["stop_grace_period"]


def test_storage_is_one_volume_mounted_alike_everywhere(compose: dict[str, Any]) -> None:
    services = compose["services"]
    mounts = {name: {interpolate(v) for v in services[name]["volumes"]} for name in SEGQ_SERVICES}
    assert all(m == mounts["gpu"] for m in mounts.values()), mounts
    (mount,) = mounts["gpu"]
    target = mount.split(":")[1]
    for name in SEGQ_SERVICES:
        env = services[name]["environment"]
        assert env["SEGQ_STORAGE"].startswith(target + "/"), (name, env["SEGQ_STORAGE"])
        assert "${SEGQ_REDIS_PASSWORD:?" in env["SEGQ_BROKER_URL"]
        assert "${SEGQ_POSTGRES_PASSWORD:?" in env["SEGQ_DATABASE_URL"]


def test_no_secret_has_a_default() -> None:
    text = COMPOSE.read_text()
    secrets = [m for m in VARIABLE.finditer(text) if re.search(r"PASSWORD|AUTH|SECRET|TOKEN", m.group(1))]
    assert {m.group(1) for m in secrets} == set(SECRETS)
    for match in secrets:
        assert match.group(2) == ":?", f"{match.group(0)} must be required (:?), never defaulted"
    literal = re.search(r"(?i)password[ \t]*[:=][ \t]*['\"]?\w", re.sub(r"\$\{[^}]*\}", "", text))
    assert literal is None, f"a literal password: {literal}"


def test_dockerfile_installs_the_package_with_its_extras() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("segq", "worker", "producer", "migrations"):
        assert f"COPY {package} /src/{package}" in dockerfile
    assert "COPY --from=source /src ./" in dockerfile
    assert 'pip install ${PIP_ARGS} ".[worker,dicom,postgres,flower]"' in dockerfile
    assert "ARG BASE_IMAGE=python:3.11-slim" in dockerfile and "FROM ${BASE_IMAGE}" in dockerfile
    assert "USER segq" in dockerfile and "chown -R segq:segq /data" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".whl" in ignored


def compose_client() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_accepts_the_file_only_with_its_secrets() -> None:
    client = compose_client()
    if client is None:
        pytest.skip("no compose client here (docker compose plugin or docker-compose); the checks above still ran")
    base = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith("SEGQ_")}
    good = subprocess.run([*client, "-f", str(COMPOSE), "config"], env={**base, **SECRETS}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    rendered = yaml.safe_load(good.stdout)
    assert rendered["services"]["redis"]["command"][-1] == SECRETS["SEGQ_REDIS_PASSWORD"]
    assert rendered["services"]["gpu"]["environment"]["SEGQ_BROKER_URL"] == "redis://:r3dis@redis:6379/0"
    for missing in SECRETS:
        env = {**base, **{k: v for k, v in SECRETS.items() if k != missing}}
        bad = subprocess.run([*client, "-f", str(COMPOSE), "config"], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode != 0 and missing in bad.stderr, (missing, bad.stderr)


def test_readme_section_says_where_compose_was_not_run() -> None:
    deploy = (ROOT / "docs" / "DEPLOY.md").read_text()
    assert "docker compose config" in deploy and "engine" in deploy
    for variable in ("SEGQ_BROKER_URL", "SEGQ_DATABASE_URL", "SEGQ_STORAGE"):
        assert variable in deploy
    assert Path(COMPOSE).name in deploy
