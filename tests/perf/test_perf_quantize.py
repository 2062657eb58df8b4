"""The int8 option (``CPREC_QUANTIZE=int8``): dynamic per-channel int8 Linear layers, close to
fp32 in cosine; refused where it does not apply. Its ranking effect is measured by
``bench/encoder.py`` (FK-LOO NDCG@10), not here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cprec.encoder import HFEncoder
from service.settings import Settings

TEXTS = [
    "Food: Dark Roast Coffee Beans; Kitchen: Stainless Steel French Press; Food: Honey",
    "Kitchen: Cast Iron Skillet",
    "Food: Green Tea Bags; Food: Oat Milk Barista Edition",
]


@pytest.mark.integration
def test_int8_close_to_fp32(minilm_dir: Path) -> None:
    fp32 = HFEncoder(minilm_dir, pooling="mean", is_decoder=False, device="cpu", dtype="float32")
    int8 = HFEncoder(
        minilm_dir, pooling="mean", is_decoder=False, device="cpu", dtype="auto", quantize="int8"
    )
    assert int8.dtype == torch.float32
    assert any("quantized" in type(m).__module__ for m in int8.model.modules())
    a = fp32.core(fp32.pre(TEXTS, "query"))
    b = int8.core(int8.pre(TEXTS, "query"))
    cos = (a * b).sum(1)  # unit vectors
    assert cos.min() >= 0.9
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)


def test_int8_refused_off_cpu_and_unknown(tiny_bert_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown quantize"):
        HFEncoder(tiny_bert_dir, pooling="mean", is_decoder=False, device="cpu", quantize="int4")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU option"):
            HFEncoder(
                tiny_bert_dir, pooling="mean", is_decoder=False, device="cuda", quantize="int8"
            )


def test_quantize_setting_defaults_off() -> None:
    assert Settings().quantize == "none"
    assert Settings(quantize="int8").quantize == "int8"


@pytest.mark.integration
def test_bf16_close_to_fp32(minilm_dir: Path) -> None:
    """The CPU default on machines with native bf16 (``CPREC_DTYPE=auto``) keeps the vectors
    within the issue's cosine 0.9999 of fp32 (0.99995 for these texts on an AMX Xeon; the
    encoder bench measures the same on 640 FK texts: ``bf16_cosine_vs_fp32``)."""
    from bench.encoder import BF16_COS

    fp32 = HFEncoder(minilm_dir, pooling="mean", is_decoder=False, device="cpu", dtype="float32")
    bf16 = HFEncoder(minilm_dir, pooling="mean", is_decoder=False, device="cpu", dtype="bfloat16")
    a = fp32.core(fp32.pre(TEXTS, "query"))
    b = bf16.core(bf16.pre(TEXTS, "query"))
    assert (a * b).sum(1).min() >= BF16_COS


@pytest.mark.integration
def test_int8_vectors_depend_on_the_batch(minilm_dir: Path) -> None:
    """Why int8 stays off: dynamic int8 scales activations per batch, so a user's vector changes
    with who shared its batch; fp32 does not."""
    from bench.encoder import BATCH_COS, batch_invariance

    texts = TEXTS + ["Food: " + "Sea Salt Caramel Popcorn Family Size 12 Pack; " * 12]
    fp32 = HFEncoder(minilm_dir, pooling="mean", is_decoder=False, device="cpu", dtype="float32")
    int8 = HFEncoder(
        minilm_dir, pooling="mean", is_decoder=False, device="cpu", dtype="auto", quantize="int8"
    )
    assert batch_invariance(fp32, texts) >= BATCH_COS
    assert batch_invariance(int8, texts) < BATCH_COS


def _q(variant: str, hits: int, loss: float, mrr_loss: float) -> dict[str, object]:
    return {
        "variant": variant,
        "hits10": hits,
        "rel_loss_vs_fp32": loss,
        "mrr_rel_loss_vs_fp32": mrr_loss,
    }


def test_int8_decision_needs_quality_speed_and_batch_invariance() -> None:
    from bench.encoder import int8_decision

    rows = [_q("fp32", 80, 0.0, 0.0), _q("int8", 82, -0.01, 0.005)]
    fast = {"speedup_vs_default_history_b1": 1.4, "speedup_vs_default_title_b32": 1.1}
    assert int8_decision({**fast, "batch_cos_min_int8": 1.0}, rows)[0]
    on, why = int8_decision({**fast, "batch_cos_min_int8": 0.97}, rows)
    assert not on and "depends on its batch" in why
    on, why = int8_decision({**fast, "batch_cos_min_int8": 1.0}, [rows[0], _q("int8", 70, 0.1, 0)])
    assert not on and "NDCG@10 loss" in why
    on, why = int8_decision({**fast, "batch_cos_min_int8": 1.0}, [_q("fp32", 10, 0, 0), rows[1]])
    assert not on and "undecided" in why
    slow = {**fast, "speedup_vs_default_title_b32": 0.9, "batch_cos_min_int8": 1.0}
    assert not int8_decision(slow, rows)[0]


def test_paired_loss_interval() -> None:
    from bench.encoder import paired_loss_ci

    rng = np.random.default_rng(0)
    ref = (rng.random(500) < 0.1).astype(float)
    assert paired_loss_ci(ref, ref) == (0.0, 0.0)  # same lists: no loss, no doubt
    assert paired_loss_ci(ref, np.zeros_like(ref)) == (1.0, 1.0)
    lo, hi = paired_loss_ci(ref, ref * (rng.random(500) < 0.9))  # ~10% of hits lost
    assert 0.0 <= lo < 0.1 < hi < 0.3
