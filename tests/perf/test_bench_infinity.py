"""The infinity-emb comparison's pieces that need neither its venv nor a network: the request
bodies, the server's command line and environment, and the venv's reuse and failure paths."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench import infinity
from bench.infinity import embed_bodies, ensure_venv, infinity_argv, infinity_env


def test_embed_bodies_send_one_text_per_request() -> None:
    bodies = embed_bodies(["a history", "another"], "minilm-l6")
    assert bodies == [
        {"model": "minilm-l6", "input": ["a history"]},
        {"model": "minilm-l6", "input": ["another"]},
    ]
    assert embed_bodies([], "m") == []


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_argv_serves_the_local_folder_on_loopback_without_caches(tmp_path: Path) -> None:
    py = tmp_path / "venv" / "bin" / "python"
    model = tmp_path / "minilm"
    argv = infinity_argv(py, model, 8123, dtype="float32", batch_size=16)
    assert argv[:2] == [str(tmp_path / "venv" / "bin" / "infinity_emb"), "v2"]
    expected = {
        "--model-id": str(model),
        "--served-model-name": "minilm-l6",
        "--host": "127.0.0.1",
        "--port": "8123",
        "--engine": "torch",
        "--device": "cpu",
        "--dtype": "float32",
        "--batch-size": "16",
        "--url-prefix": "",
    }
    assert {k: _flag(argv, k) for k in expected} == expected
    # every request must run the model, as it does in our service
    assert {"--no-vector-disk-cache", "--no-compile"} <= set(argv)
    assert _flag(infinity_argv(py, model, 1), "--dtype") == "bfloat16"


def test_env_keeps_openmp_settings_and_turns_off_downloads_and_telemetry(tmp_path: Path) -> None:
    base = {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "20000", "HF_HUB_OFFLINE": "0"}
    env = infinity_env(base, tmp_path)
    assert env["OMP_NUM_THREADS"] == "2" and env["GOMP_SPINCOUNT"] == "20000"
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["DO_NOT_TRACK"] == "1" and env["INFINITY_ANONYMOUS_USAGE_STATS"] == "0"
    assert env["INFINITY_HOME"] == str(tmp_path)
    assert base["HF_HUB_OFFLINE"] == "0"  # the caller's mapping is left alone


def test_a_finished_venv_is_reused_without_pip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    py = tmp_path / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.touch()
    (tmp_path / infinity.MARKER).write_text("infinity-emb==0.0.78\n")

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished venv must not be rebuilt")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "call", no_subprocess)
    assert ensure_venv(tmp_path) == py


def test_a_failed_install_says_why_and_leaves_no_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "venv"
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)  # python -m venv: make the folder, install nothing
        (root / "bin").mkdir(parents=True, exist_ok=True)
        (root / "bin" / "python").touch()
        return subprocess.CompletedProcess(cmd, 0, "", "")

    def fake_call(cmd: list[str], stdout: object = None, **kwargs: object) -> int:
        calls.append(cmd)
        stdout.write(b"ERROR: Could not find a version that satisfies torch==2.13.0\n")  # type: ignore[attr-defined]
        return 1

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(subprocess, "call", fake_call)
    with pytest.raises(RuntimeError, match="PyPI reachable") as err:
        ensure_venv(root)
    assert "Could not find a version" in str(err.value)
    assert calls[1][-1] == infinity.TORCH  # torch goes in first, on its own
    assert not (root / infinity.MARKER).exists()
