"""On a CUDA device: the index moved to the GPU answers as the CPU one, the encoder in bf16 on CUDA
agrees with fp32 on the CPU, the service starts with ``CPREC_DEVICE=cuda``, and ``hier`` training
steps on CUDA track the CPU's.

Skipped without CUDA (tests/gpu/conftest.py); ``bench/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.gpu

DEMO_CATALOG = Path(__file__).resolve().parents[2] / "service" / "data" / "demo_catalog.jsonl"


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def demo_rows(n: int) -> list[dict[str, str]]:
    lines = DEMO_CATALOG.read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines if x][:n]


def test_gpu_index_answers_as_the_cpu_index() -> None:
    """Exact search on the GPU: the same top-10 rows per query, scores within 1e-4 (float
    summation order differs), the exclude-seen over-fetch included."""
    from service.catalog import Item
    from service.index import ItemIndex, gpu_available

    if not gpu_available():
        pytest.skip("faiss-gpu not installed")
    rng = np.random.default_rng(0)
    items = [Item(f"i{n}", ("Books", "Movies")[n % 2], f"title {n}") for n in range(2000)]
    vectors = unit(rng.standard_normal((2000, 64)))  # [N, 64]
    cpu = ItemIndex.build(items, vectors, "m1", kind="flat")
    gpu = ItemIndex.build(items, vectors, "m1", kind="flat", use_gpu=True)
    assert gpu.on_gpu and not cpu.on_gpu
    queries = unit(rng.standard_normal((25, 64)))  # [Q, 64]
    for domain in cpu.domains:
        seen = cpu.rows_by_domain[domain][:5].tolist()
        for exclude in ((), seen):
            want = cpu.search(domain, queries, 10, exclude)
            got = gpu.search(domain, queries, 10, exclude)
            for a, b in zip(want, got, strict=True):
                assert [r for r, _ in b] == [r for r, _ in a]
                np.testing.assert_allclose([s for _, s in b], [s for _, s in a], atol=1e-4)
                if exclude:
                    assert not set(seen) & {r for r, _ in b}


def test_bf16_encoder_on_cuda_agrees_with_fp32(tmp_path: Path) -> None:
    """What the service runs on a GPU (bf16) stays where fp32 puts each vector: 50 catalogue
    titles and 10 history texts, each cosine >= 0.999."""
    import torch

    from cprec.encoder import HFEncoder
    from cprec.lm import TextKind
    from cprec.text import Behaviour, Template

    rows = demo_rows(80)
    titles = [r["title"] for r in rows[:50]]
    tpl = Template()
    histories = [
        tpl.render_history([Behaviour(r["domain"], r["title"]) for r in rows[i : i + 8]])
        for i in range(0, 80, 8)
    ]
    gpu = HFEncoder.from_base("minilm-l6", tmp_path, device="cuda", dtype="bfloat16")
    cpu = HFEncoder.from_base("minilm-l6", tmp_path, device="cpu", dtype="float32")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    cases: list[tuple[list[str], TextKind]] = [(titles, "item"), (histories, "query")]
    for texts, kind in cases:
        cos = np.sum(gpu.encode(texts, kind) * cpu.encode(texts, kind), axis=1)  # unit vectors
        worst = int(np.argmin(cos))
        assert cos[worst] >= 0.999, f"{kind} {texts[worst]!r}: cosine {cos[worst]:.5f}"


def test_service_starts_on_cuda(catalog_path: Path) -> None:
    """``python -m service`` with CPREC_DEVICE=cuda: ready, answers /recommend, and its encoder
    says it runs on cuda (a CUDA request that fell back to the CPU would be an error)."""
    from bench.common import run_service

    env = {"CPREC_DEVICE": "cuda", "CPREC_LOG_LEVEL": "INFO"}
    with run_service(catalog_path, None, env, startup_timeout_s=300) as svc:
        ready = httpx.get(f"{svc.url}/ready", timeout=10)
        assert ready.status_code == 200, ready.text
        body = {"history": [{"domain": "Groceries", "title": "Dark Roast Coffee Beans"}], "k": 3}
        rec = httpx.post(f"{svc.url}/recommend", json=body, timeout=60)
        assert rec.status_code == 200, rec.text
        assert rec.json()["results"], rec.text
        log = svc.log_path.read_text(errors="replace")
        assert " on cuda" in log, log[-2000:]


def hier_steps(device: str, bf16: bool, steps: int = 5) -> tuple[list[float], list[list[int]]]:
    """Losses of ``steps`` Adam steps of the hier ``Trainer`` on ``device`` (toy data over the
    demo catalogue, random text vectors, dropout off so devices differ only in float order) and
    its ranking of 20 test cases."""
    import torch

    from training.hier import (
        HierTrainConfig,
        Trainer,
        build_corpus,
        make_batches,
        new_model,
        windows,
    )

    model = {"dim": 32, "ffn": 64, "dropout": 0.0, "attn_dropout": 0.0, "max_len": 20}
    cfg = HierTrainConfig.model_validate(
        {"target": "toy", "model": model, "pretrain": {"enabled": False}, "progress": False}
    )
    corpus = build_corpus(cfg)
    text = torch.from_numpy(unit(np.random.default_rng(0).standard_normal((len(corpus.items), 32))))
    inp, tgt = windows(corpus.target_source.mixed, cfg.model.max_len)
    batches = make_batches(inp, tgt, 0, 128, np.random.default_rng(0))[:steps]
    torch.manual_seed(0)
    tr = Trainer(new_model(cfg, corpus, text), corpus, text, "domain", bf16=bf16, device=device)
    assert tr.text.device.type == next(tr.model.parameters()).device.type == tr.device.type
    opt = torch.optim.Adam(tr.model.parameters(), lr=1e-3)
    losses = []
    for b in batches:
        loss, _ = tr.loss(b)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, tr.rank(corpus.target.test[:20])


@pytest.mark.parametrize("bf16", [False, True])
def test_hier_training_on_cuda_tracks_the_cpu(bf16: bool) -> None:
    """``Trainer(device="cuda")`` (``HierTrainConfig.device``): every loss finite and within 1% of
    the CPU's fp32 run (bf16: 5%), and ranking returns host lists like the CPU's (fp32: the same
    top-10 up to near-ties)."""
    cpu, cpu_top = hier_steps("cpu", bf16=False)
    gpu, gpu_top = hier_steps("cuda", bf16=bf16)
    assert np.isfinite(gpu).all(), gpu
    np.testing.assert_allclose(gpu, cpu, rtol=5e-2 if bf16 else 1e-2)
    assert [len(r) for r in gpu_top] == [len(r) for r in cpu_top]
    if not bf16:
        overlap = np.mean(
            [len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(gpu_top, cpu_top, strict=True)]
        )
        assert overlap >= 0.9, overlap
