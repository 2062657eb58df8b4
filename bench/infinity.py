"""infinity-emb 0.0.78 serving the same MiniLM on the same machine: the established embedding
server that the service's history-text path is compared against (issue #18).

infinity is installed in a throwaway venv under ``var/bench`` (it is never a dependency of cprec:
its pins, numpy<2 among them, clash with ours), started as its own process on a loopback port,
and fed one FK-LOO history text per ``POST /embeddings`` at concurrency 32 by the same
closed-loop generator that drives ``/recommend`` (``bench.common.drive``).

    python -m bench.infinity [--texts 200] [--dtype auto|bfloat16|float32] [--rounds 3]

Nothing is downloaded at run time: the weights are the bundled MiniLM folder and the server runs
with ``HF_HUB_OFFLINE=1``. The server inherits this process's environment, so its OpenMP and
oneDNN settings (``cprec.runtime``, set by ``bench/__init__.py``) are the ones ``run_service``
gives our service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from bench.common import (
    REPO,
    drive,
    free_port,
    history_texts,
    load_fk,
    print_table,
    save_result,
    subset,
)

VERSION = "0.0.78"
VENV = REPO / "var" / "bench" / f"infinity-{VERSION}"
# Installed on its own and first: the CPU wheel; a looser spec pulls GBs of CUDA packages.
TORCH = "torch==2.13.0"
PACKAGE = f"infinity-emb[server,torch]=={VERSION}"
# The versions this benchmark was run with. infinity's own metadata caps numpy (<2), click,
# typer, uvicorn and sentence-transformers, but not transformers or fastapi; pinning the whole
# stack keeps a later release of either from changing what is measured.
PINS = (
    "numpy==1.26.4",
    "transformers==4.57.6",
    "tokenizers==0.22.2",
    "sentence-transformers==3.4.1",
    "huggingface_hub==0.36.2",
    "fastapi==0.165.0",
    "starlette==1.10.0",
    "pydantic==2.14.4",
    "uvicorn==0.32.1",
    "click==8.1.8",
    "typer==0.12.5",
)
MARKER = "cprec-freeze.txt"  # written last: its presence means the install finished
Dtype = Literal["bfloat16", "float32"]
CONCURRENCY = 32


# -- the throwaway venv ------------------------------------------------------------------------
def venv_python(root: Path) -> Path:
    return root / "bin" / "python"


def _pip(py: Path, *args: str, log: Path) -> None:
    """``pip install`` into the venv, its output appended to ``log``; a failure says why."""
    with open(log, "ab") as fh:
        fh.write(f"\n$ pip install {' '.join(args)}\n".encode())
        fh.flush()
        rc = subprocess.call(
            [str(py), "-m", "pip", "install", "--no-input", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    if rc != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(
            f"pip could not install {' '.join(args)} into {py.parent.parent} (exit {rc}); "
            "the infinity benchmark needs PyPI reachable once to build its venv. "
            f"Full log: {log}\n{tail}"
        )


def ensure_venv(root: Path = VENV) -> Path:
    """The venv's python, building the venv first unless a finished one is there (marker file).

    A venv without the marker is a half-finished install and is rebuilt from scratch.
    """
    py = venv_python(root)
    if (root / MARKER).is_file() and py.exists():
        return py
    root.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
    log = root / "cprec-install.log"
    t0 = time.perf_counter()
    _pip(py, TORCH, log=log)
    _pip(py, PACKAGE, *PINS, log=log)
    freeze = subprocess.run(
        [str(py), "-m", "pip", "freeze"], check=True, capture_output=True, text=True
    ).stdout
    (root / MARKER).write_text(
        f"# {PACKAGE} installed in {time.perf_counter() - t0:.0f}s\n{freeze}", encoding="utf-8"
    )
    return py


# -- the server ----------------------------------------------------------------------------------
def infinity_argv(
    py: Path,
    model_dir: Path,
    port: int,
    dtype: Dtype = "bfloat16",
    batch_size: int = 32,
    served_name: str = "minilm-l6",
) -> list[str]:
    """The server's command line. Its result cache and torch.compile are off so every request
    runs the model as ours does; BetterTransformer is off because it needs optimum, which is not
    installed (infinity would skip it anyway)."""
    return [
        str(py.parent / "infinity_emb"),
        "v2",
        "--model-id",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--engine",
        "torch",
        "--device",
        "cpu",
        "--dtype",
        dtype,
        "--batch-size",
        str(batch_size),
        "--url-prefix",
        "",
        "--no-vector-disk-cache",
        "--no-compile",
        "--no-bettertransformer",
        "--log-level",
        "warning",
    ]


def infinity_env(base: Mapping[str, str], home: Path) -> dict[str, str]:
    """``base`` (OpenMP settings included) with hub downloads and usage reporting turned off,
    and infinity's cache folder under ``home`` instead of the working directory."""
    return {
        **base,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "INFINITY_HOME": str(home),
    }


@contextlib.contextmanager
def run_infinity(
    model_dir: Path,
    dtype: Dtype = "bfloat16",
    batch_size: int = 32,
    py: Path | None = None,
    startup_timeout_s: float = 600,
) -> Iterator[str]:
    """infinity on a free loopback port until the block exits; yields its base URL.

    Ready means ``GET /health`` answers 200, which infinity does only after its model warm-up.
    """
    import httpx

    py = py or ensure_venv()
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="cprec-infinity-"))
    log_path = tmp / "infinity.log"
    url = f"http://127.0.0.1:{port}"
    argv = infinity_argv(py, model_dir, port, dtype, batch_size)
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            argv,
            cwd=tmp,
            env=infinity_env(os.environ, tmp),
            stdout=logf,
            stderr=subprocess.STDOUT,
        )

    def log_tail() -> str:
        return f"command: {' '.join(argv)}\n" + log_path.read_text(errors="replace")[-3000:]

    try:
        deadline = time.time() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"infinity exited with {proc.returncode}:\n{log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.time() > deadline:
                raise TimeoutError(f"infinity not ready after {startup_timeout_s}s:\n{log_tail()}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def served_models(url: str) -> list[str]:
    """The model names ``/embeddings`` accepts (``GET /models``)."""
    import httpx

    resp = httpx.get(url + "/models", timeout=10)
    resp.raise_for_status()
    return [m["id"] for m in resp.json()["data"]]


def embed_bodies(texts: list[str], model_name: str) -> list[dict[str, Any]]:
    """One text per request, as a user history reaches our service (the OpenAI-style body)."""
    return [{"model": model_name, "input": [t]} for t in texts]


# -- the benchmark -------------------------------------------------------------------------------
def resolve_dtype(choice: str) -> Dtype:
    """``auto`` picks what our service picks on this CPU (``cprec.lm.resolve_dtype``)."""
    if choice != "auto":
        return "bfloat16" if choice == "bfloat16" else "float32"
    from cprec.lm import cpu_has_fast_bf16

    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def run(n_texts: int, dtype: Dtype, rounds: int, max_s: float, seed: int = 5) -> dict[str, Any]:
    from cprec.lm import bundled_dir

    t0 = time.perf_counter()
    py = ensure_venv()
    venv_s = time.perf_counter() - t0
    fk = load_fk()
    # seed 5: the histories bench/serve.py sends as its cache-miss traffic
    texts = history_texts(fk, subset(fk.cases, n_texts, seed=seed))
    model_dir = bundled_dir("minilm-l6", REPO / "var" / "store")
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with run_infinity(model_dir, dtype=dtype, py=py) as url:
        startup_s = time.perf_counter() - t0
        server_argv = infinity_argv(py, model_dir, int(url.rsplit(":", 1)[1]), dtype)
        models = served_models(url)
        bodies = embed_bodies(texts, models[0])
        # Untimed: the first requests pay for lazy set-up in the HTTP stack, not the model.
        asyncio.run(drive(url, bodies, CONCURRENCY, CONCURRENCY * 2, max_s, path="/embeddings"))
        for r in range(rounds):
            res = asyncio.run(
                drive(url, bodies, CONCURRENCY, len(bodies), max_s, path="/embeddings")
            )
            s = res.summary()
            rows.append(
                {
                    "round": r + 1,
                    "texts": res.ok,
                    "failed": res.failed,
                    "texts_per_s": s["rps"],
                    "p50_ms": s["p50_ms"],
                    "p99_ms": s["p99_ms"],
                    "elapsed_s": round(res.elapsed_s, 2),
                    "p95_ms": s["p95_ms"],
                    "status": res.status,
                }
            )
    print_table(
        f"infinity-emb {VERSION}, MiniLM-L6 {dtype}, concurrency {CONCURRENCY}",
        rows,
        ["round", "texts", "failed", "texts_per_s", "p50_ms", "p99_ms", "elapsed_s"],
    )
    marker = py.parent.parent / MARKER
    freeze = marker.read_text(encoding="utf-8") if marker.is_file() else ""
    return {
        "mode": "quick",
        "system": f"infinity-emb {VERSION}",
        "model": "minilm-l6",
        "dtype": dtype,
        "concurrency": CONCURRENCY,
        "texts": len(texts),
        "rounds": rows,
        "texts_per_s_median": statistics.median(r["texts_per_s"] for r in rows),
        "server_argv": server_argv,
        "served_model": models[0],
        "startup_s": round(startup_s, 1),
        "venv_ready_s": round(venv_s, 1),
        "venv_freeze": [ln for ln in freeze.splitlines() if ln and not ln.startswith("#")],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", type=int, default=1000, help="FK-LOO histories sent per round")
    ap.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32"],
        default="auto",
        help="auto: the dtype our service picks on this CPU (bf16 only with native bf16)",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-s", type=float, default=120.0, help="time cap of one round")
    args = ap.parse_args(argv)
    result = run(args.texts, resolve_dtype(args.dtype), args.rounds, args.max_s)
    print(f"\nsaved {save_result('infinity', result)}")
    return result


if __name__ == "__main__":
    main()
