"""The int8 option (``CPREC_QUANTIZE=int8``): dynamic per-channel int8 Linear layers, close to
fp32 in cosine; refused where it does not apply. Its ranking effect is measured by
``bench/encoder.py`` (FK-LOO NDCG@10), not here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.encoder import HFEncoder
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
