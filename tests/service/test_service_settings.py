"""Settings: env prefix, REDIS_URL alias, the tuning tier and its device policy, validation,
settings that cannot take effect, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import DEVICE_POLICY, Settings


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
        ("CPREC_TUNING__MAX_BATCH_SIZE", "0"),
        ("CPREC_ENV", "staging"),
        ("CPREC_TUNING__MAX_WAIT_MS", "-1"),
        ("CPREC_MAX_LENGTH", "4"),
        ("CPREC_BATCHING", "perhaps"),
    ],
)
def test_invalid_values_refused(monkeypatch: pytest.MonkeyPatch, env: str, value: str) -> None:
    monkeypatch.setenv(env, value)
    field = env.removeprefix("CPREC_").split("__")[-1].lower()
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
        monkeypatch.setenv("CPREC_TUNING__BATCH_MAX_PADDING", env)
    assert Settings().tuning.for_device(device).batch_max_padding == expected


@pytest.mark.parametrize("bad", ["-0.1", "sometimes"])
def test_batch_max_padding_rejects_nonsense(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("CPREC_TUNING__BATCH_MAX_PADDING", bad)
    with pytest.raises(ValidationError, match="batch_max_padding"):
        Settings()


@pytest.mark.parametrize(
    ("env", "device", "expected"),
    [
        (None, "cpu", DEVICE_POLICY["cpu"]["batch_coalesce_ms"]),  # wait for cohorts on CPU
        (None, "cuda", 0.0),  # auto: the fixed max_wait_ms window on a GPU
        ("10", "cuda", 10.0),
        ("0", "cpu", 0.0),
    ],
)
def test_batch_coalesce_resolves_per_device(
    monkeypatch: pytest.MonkeyPatch, env: str | None, device: str, expected: float
) -> None:
    if env is not None:
        monkeypatch.setenv("CPREC_TUNING__BATCH_COALESCE_MS", env)
    assert Settings().tuning.for_device(device).batch_coalesce_ms == expected


def test_every_auto_knob_is_concrete_on_each_device() -> None:
    for device in ("cpu", "cuda"):
        resolved = Settings().tuning.for_device(device).model_dump()
        assert "auto" not in resolved.values() and "none" not in resolved.values(), device
    assert Settings().tuning.for_device("cuda").batch_max_forward_tokens is None


@pytest.mark.parametrize("bad", ["-1", "5000", "often"])
def test_batch_coalesce_rejects_nonsense(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("CPREC_TUNING__BATCH_COALESCE_MS", bad)
    with pytest.raises(ValidationError, match="batch_coalesce_ms"):
        Settings()


@pytest.mark.parametrize("bad", ["-0.1", "1.5", "half"])
def test_batch_coalesce_share_rejects_nonsense(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("CPREC_TUNING__BATCH_COALESCE_SHARE", bad)
    with pytest.raises(ValidationError, match="batch_coalesce_share"):
        Settings()


def test_a_knob_under_its_old_flat_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """It would be silently ignored (extra settings are), so start-up names the new variable."""
    monkeypatch.setenv("CPREC_BATCH_COALESCE_MS", "10")
    with pytest.raises(ValidationError, match="CPREC_TUNING__BATCH_COALESCE_MS"):
        Settings()
    monkeypatch.delenv("CPREC_BATCH_COALESCE_MS")
    with pytest.raises(ValidationError, match="CPREC_TUNING__MAX_WAIT_MS"):
        Settings(max_wait_ms=5)  # type: ignore[call-arg]
    assert Settings(tuning={"max_wait_ms": 5}).tuning.max_wait_ms == 5


def test_base_model_settings_refused_with_a_store_model(monkeypatch: pytest.MonkeyPatch) -> None:
    Settings().check_store_model("v1")  # defaults: nothing to refuse
    monkeypatch.setenv("CPREC_MAX_LENGTH", "128")
    with pytest.raises(ValueError, match="CPREC_MAX_LENGTH cannot take effect"):
        Settings().check_store_model("v1")
    with pytest.raises(ValueError, match="CPREC_HISTORY_MAX_ITEMS"):
        Settings(history_max_items=5).check_store_model("v1")


def test_access_log_setting_reaches_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn's per-request access line is on by default and off with CPREC_ACCESS_LOG=false."""
    from service.__main__ import uvicorn_config

    assert uvicorn_config(object(), Settings()).access_log is True
    monkeypatch.setenv("CPREC_ACCESS_LOG", "false")
    cfg = uvicorn_config(object(), Settings())
    assert cfg.access_log is False and cfg.log_level == "info"
