"""Deployment files: docker-compose.yml validated by `docker-compose config`, and deploy/Dockerfile.

`docker-compose config` only parses, interpolates and validates the file; it needs no Docker engine.
Run hermetically: no `.env` file, no COMPOSE_*/CPREC_* variables from the caller's shell.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
TOKEN = "test-admin-token-0123456789"

needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose is not on PATH (Debian: apt-get install docker-compose)",
)


def _compose_config(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "CPREC_", "DOCKER_"))
    }
    clean.update(env)
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    return subprocess.run(
        [
            "docker-compose",
            "--env-file",
            str(empty_env_file),
            "-f",
            str(COMPOSE_FILE),
            "config",
        ],
        cwd=tmp_path,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    proc = _compose_config(tmp_path_factory.mktemp("compose"), CPREC_ADMIN_TOKEN=TOKEN)
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stdout}\n{proc.stderr}"
    data = yaml.safe_load(proc.stdout)
    assert isinstance(data, dict)
    return data


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE form
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _healthcheck_test(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    return [
        d for d in devices if d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or [])
    ]


def _volume_targets(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only), for both the short and the long volume syntax."""
    out: dict[str, tuple[str, bool]] = {}
    for vol in service.get("volumes") or []:
        if isinstance(vol, str):
            parts = vol.split(":")
            source, target = parts[0], parts[1]
            mode = parts[2] if len(parts) > 2 else "rw"
            out[target] = (source, "ro" in mode.split(","))
        else:
            out[vol["target"]] = (str(vol.get("source", "")), bool(vol.get("read_only", False)))
    return out


@needs_compose
def test_services_exist(config: dict[str, Any]) -> None:
    assert {"redis", "api", "train"} <= set(config["services"])


@needs_compose
def test_redis_healthcheck(config: dict[str, Any]) -> None:
    redis = config["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    assert "redis-cli" in _healthcheck_test(redis) and "ping" in _healthcheck_test(redis)


@needs_compose
def test_api_waits_for_healthy_redis(config: dict[str, Any]) -> None:
    depends_on = config["services"]["api"]["depends_on"]
    assert isinstance(depends_on, dict), "api.depends_on needs the long form with a condition"
    assert depends_on["redis"]["condition"] == "service_healthy"


@needs_compose
def test_api_healthcheck_uses_ready(config: dict[str, Any]) -> None:
    api = config["services"]["api"]
    test = _healthcheck_test(api)
    assert "/ready" in test
    assert "curl" not in test, "slim images have no curl"
    assert "start_period" in api["healthcheck"]


@needs_compose
@pytest.mark.parametrize("name", ["api", "train"])
def test_gpu_reservation(config: dict[str, Any], name: str) -> None:
    assert _gpu_devices(config["services"][name]), f"{name}: no nvidia GPU device reservation"


@needs_compose
def test_train_is_behind_a_profile(config: dict[str, Any]) -> None:
    train = config["services"]["train"]
    assert "train" in train["profiles"]
    assert "profiles" not in config["services"]["api"]
    assert "training" in " ".join(map(str, train["command"]))


@needs_compose
def test_api_environment(config: dict[str, Any]) -> None:
    env = _environment(config["services"]["api"])
    assert env["CPREC_ADMIN_TOKEN"] == TOKEN
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["REDIS_URL"].startswith("redis://redis:6379")
    assert env["CPREC_STORE_DIR"] == "/var/lib/cprec"


@needs_compose
def test_store_volume_shared_and_data_read_only(config: dict[str, Any]) -> None:
    api = _volume_targets(config["services"]["api"])
    train = _volume_targets(config["services"]["train"])
    assert "/var/lib/cprec" in api and "/var/lib/cprec" in train
    assert api["/var/lib/cprec"][0] == train["/var/lib/cprec"][0], "api and train share the store"
    train_env = _environment(config["services"]["train"])
    assert train_env["HF_HUB_OFFLINE"] == "1"
    data_dir = train_env["CPREC_SHARED_DIR"]  # what training.fkloo.shared_dir() reads
    assert data_dir in train and train[data_dir][1], "training data must be mounted read-only"


@needs_compose
def test_api_port_on_loopback_by_default(config: dict[str, Any]) -> None:
    ports = config["services"]["api"]["ports"]
    rendered = [
        p if isinstance(p, str) else f"{p.get('host_ip', '')}:{p.get('published')}:{p['target']}"
        for p in ports
    ]
    assert any(p.startswith("127.0.0.1:8000:8000") for p in rendered), rendered


@needs_compose
def test_config_fails_without_admin_token(tmp_path: Path) -> None:
    proc = _compose_config(tmp_path)
    assert proc.returncode != 0
    assert "CPREC_ADMIN_TOKEN" in proc.stdout + proc.stderr


def test_dockerfile_pins_torch_offline_and_non_root() -> None:
    text = DOCKERFILE.read_text()
    # Join line continuations so multi-line instructions read as one.
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]

    assert re.search(r"\btorch==2\.13\.0\b", text)
    torch_reqs = [
        tok.strip("'\";")
        for ln in instructions
        if "pip install" in ln
        for tok in ln.split()
        if re.fullmatch(r"['\"]?torch([<>=!~;'\"].*)?", tok)
    ]
    assert torch_reqs and set(torch_reqs) == {"torch==2.13.0"}, torch_reqs

    env_lines = [ln for ln in instructions if ln.upper().startswith("ENV ")]
    assert any(re.search(r"\bHF_HUB_OFFLINE=1\b", ln) for ln in env_lines)

    users = [ln.split(None, 1)[1].strip() for ln in instructions if ln.upper().startswith("USER ")]
    assert users, "no USER instruction: the container would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}

    assert any(ln.upper().startswith("EXPOSE ") and "8000" in ln for ln in instructions)
    cmd = [ln for ln in instructions if ln.upper().startswith("CMD ")]
    assert cmd and "service" in cmd[-1] and "0.0.0.0" in cmd[-1]
    # Index hosts are passed in (TORCH_INDEX_URL), never hard-coded.
    assert not re.search(r"--(extra-)?index-url\s+https?://", text)


@needs_compose
def test_replicated_form(config: dict[str, Any]) -> None:
    """The replicated profile: API replicas with no host port of their own behind the proxy,
    on the same store volume and Redis as the single API (docs/scaling.md)."""
    rep, lb = config["services"]["api-replica"], config["services"]["lb"]
    assert "replicated" in rep["profiles"] and "replicated" in lb["profiles"]
    assert not rep.get("ports")
    assert (
        _volume_targets(rep)["/var/lib/cprec"][0]
        == _volume_targets(config["services"]["api"])["/var/lib/cprec"][0]
    )
    env = _environment(rep)
    assert env["REDIS_URL"].startswith("redis://redis:6379") and "CPREC_WORKERS" in env
    assert lb["depends_on"]["api-replica"]["condition"] == "service_healthy"
    conf = (REPO / "deploy" / "nginx.conf").read_text()
    assert "server api-replica:8000" in conf
    assert any("nginx.conf" in str(v) for v in lb["volumes"])
