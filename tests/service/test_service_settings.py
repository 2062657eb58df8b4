"""Settings: env prefix, REDIS_URL alias, validation, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import CPU_COALESCE_MS, Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("CPREC_") or k == "REDIS_URL":
            monkeypatch.delenv(k)


def test_defaults() -> None:
    s = Settings()
    assert s.host == "127.0.0.1" and s.port == 8000 and s.redis_url is None
    assert s.admin_token is None and s.batching is True and s.index_kind == "flat"


def test_env_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CPREC_PORT", "9123")
    monkeypatch.setenv("CPREC_STORE_DIR", str(tmp_path))
    monkeypatch.setenv("CPREC_BATCHING", "false")
    monkeypatch.setenv("CPREC_CORS_ORIGINS", '["http://a.example"]')
    monkeypatch.setenv("PORT", "1")  # unprefixed names are not ours
    s = Settings()
    assert s.port == 9123 and s.store_dir == tmp_path and s.batching is False
    assert s.cors_origins == ["http://a.example"]


def test_redis_url_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/2")
    assert Settings().redis_url == "redis://cache:6379/2"
    monkeypatch.delenv("REDIS_URL")
    monkeypatch.setenv("CPREC_REDIS_URL", "redis://other:6379/0")
    assert Settings().redis_url == "redis://other:6379/0"


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("CPREC_PORT", "0"),
        ("CPREC_PORT", "70000"),
        ("CPREC_INDEX_KIND", "ivf"),
        ("CPREC_MAX_BATCH_SIZE", "0"),
        ("CPREC_ENV", "staging"),
        ("CPREC_MAX_WAIT_MS", "-1"),
        ("CPREC_MAX_LENGTH", "4"),
        ("CPREC_BATCHING", "perhaps"),
    ],
)
def test_invalid_values_refused(monkeypatch: pytest.MonkeyPatch, env: str, value: str) -> None:
    monkeypatch.setenv(env, value)
    field = env.removeprefix("CPREC_").lower()
    with pytest.raises(ValidationError, match=field):
        Settings()


def test_short_admin_token_refused() -> None:
    with pytest.raises(ValidationError, match="at least 8 characters"):
        Settings(admin_token="short")
    assert Settings(admin_token="").admin_token is None  # empty = admin off
    assert Settings(admin_token="long-enough").admin_token is not None


def test_default_token_refused_in_production() -> None:
    with pytest.raises(ValidationError, match="default admin token"):
        Settings(env="production", admin_token="changeme")
    assert Settings(env="development", admin_token="changeme").admin_token is not None


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.port = 1  # type: ignore[misc]


def test_redacted_hides_secrets() -> None:
    s = Settings(admin_token="super-secret-token", redis_url="redis://:hunter2pw@cache:6379/0")
    r = s.redacted()
    text = repr(r)
    assert "super-secret-token" not in text and "hunter2pw" not in text
    assert r["admin_token"] == "***"
    assert r["redis_url"] == "redis://***@cache:6379/0"
    assert r["port"] == 8000 and isinstance(r["store_dir"], str)
    plain = Settings(redis_url="redis://cache:6379/0").redacted()
    assert plain["redis_url"] == "redis://cache:6379/0" and plain["admin_token"] is None


@pytest.mark.parametrize(
    ("env", "device", "expected"),
    [
        (None, "cpu", 0.25),  # auto: split forwards on CPU
        (None, "cuda", None),  # auto: one padded forward on a GPU
        ("none", "cpu", None),
        ("0.5", "cuda", 0.5),
        ("0", "cpu", 0.0),
    ],
)
def test_batch_max_padding_resolves_per_device(
    monkeypatch: pytest.MonkeyPatch, env: str | None, device: str, expected: float | None
) -> None:
    if env is not None:
        monkeypatch.setenv("CPREC_BATCH_MAX_PADDING", env)
    assert Settings().resolved_max_padding(device) == expected


@pytest.mark.parametrize("bad", ["-0.1", "sometimes"])
def test_batch_max_padding_rejects_nonsense(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("CPREC_BATCH_MAX_PADDING", bad)
    with pytest.raises(ValidationError, match="batch_max_padding"):
        Settings()


@pytest.mark.parametrize(
    ("env", "device", "expected"),
    [
        (None, "cpu", CPU_COALESCE_MS),  # auto: wait for whole cohorts on CPU
        (None, "cuda", 0.0),  # auto: the fixed max_wait_ms window on a GPU
        ("10", "cuda", 10.0),
        ("0", "cpu", 0.0),
    ],
)
def test_batch_coalesce_resolves_per_device(
    monkeypatch: pytest.MonkeyPatch, env: str | None, device: str, expected: float
) -> None:
    if env is not None:
        monkeypatch.setenv("CPREC_BATCH_COALESCE_MS", env)
    assert Settings().resolved_coalesce_ms(device) == expected


@pytest.mark.parametrize("bad", ["-1", "5000", "often"])
def test_batch_coalesce_rejects_nonsense(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("CPREC_BATCH_COALESCE_MS", bad)
    with pytest.raises(ValidationError, match="batch_coalesce_ms"):
        Settings()


@pytest.mark.parametrize("bad", ["-0.1", "1.5", "half"])
def test_batch_coalesce_share_rejects_nonsense(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("CPREC_BATCH_COALESCE_SHARE", bad)
    with pytest.raises(ValidationError, match="batch_coalesce_share"):
        Settings()


def test_access_log_setting_reaches_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn's per-request access line is on by default and off with CPREC_ACCESS_LOG=false."""
    from service.__main__ import uvicorn_config

    assert uvicorn_config(object(), Settings()).access_log is True
    monkeypatch.setenv("CPREC_ACCESS_LOG", "false")
    cfg = uvicorn_config(object(), Settings())
    assert cfg.access_log is False and cfg.log_level == "info"
