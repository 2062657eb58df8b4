"""HFEncoder over tiny random BERT and Llama models, and the FakeEncoder the other tests rely on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cprec.encoder import FakeEncoder, HFEncoder

TEXTS = [
    "Groceries: dark roast coffee beans",
    "Books: space opera saga volume one; Movies: the haunted garden",
    "coffee",
    "Groceries: green tea; Groceries: oat milk; Books: a history of tea; Movies: space saga",
]


@pytest.fixture(scope="module")
def bert_encoder(tiny_bert_dir: Path) -> HFEncoder:
    return HFEncoder(
        tiny_bert_dir,
        pooling="mean",
        is_decoder=False,
        max_length=64,
        device="cpu",
        dtype="float32",
    )


@pytest.fixture(scope="module")
def llama_encoder(tiny_llama_dir: Path) -> HFEncoder:
    return HFEncoder(
        tiny_llama_dir,
        pooling="last",
        is_decoder=True,
        max_length=64,
        device="cpu",
        dtype="float32",
    )


@pytest.fixture(params=["bert", "llama"])
def encoder(
    request: pytest.FixtureRequest, bert_encoder: HFEncoder, llama_encoder: HFEncoder
) -> HFEncoder:
    return bert_encoder if request.param == "bert" else llama_encoder


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_unit_norm_and_dim(encoder: HFEncoder) -> None:
    out = encoder.encode(TEXTS, "query")
    assert out.shape == (len(TEXTS), 32) and encoder.dim == 32
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # Different texts give different vectors (a broken pooling returning constants would not).
    assert np.abs(out[0] - out[1]).max() > 1e-3


def test_batched_equals_one_by_one(encoder: HFEncoder) -> None:
    batched = encoder.encode(TEXTS, "query", batch_size=len(TEXTS))
    single = np.stack([encoder.encode([t], "query")[0] for t in TEXTS])
    assert np.all(_cos(batched, single) > 1 - 1e-5)


def test_padding_does_not_change_vectors(encoder: HFEncoder) -> None:
    short = encoder.pre(["coffee"], "query")[0]
    long = encoder.pre([TEXTS[3]], "query")[0]
    assert len(long) > len(short) + 5
    alone = encoder.core([short])[0]
    padded = encoder.core([short, long])[0]  # short is right-padded to the long one's width
    assert _cos(alone, padded) > 1 - 1e-5


def test_encode_keeps_input_order(encoder: HFEncoder) -> None:
    # encode() sorts by length internally; the output must still follow the input order.
    fwd = encoder.encode(TEXTS, "item", batch_size=2)
    rev = encoder.encode(TEXTS[::-1], "item", batch_size=2)[::-1]
    assert np.all(_cos(fwd, rev) > 1 - 1e-5)


def test_decoder_pools_the_eos_position(llama_encoder: HFEncoder) -> None:
    ids = llama_encoder.pre(["coffee tea"], "query")[0]
    assert ids[-1] == llama_encoder.tokenizer.tok.eos_token_id
    # Last-token pooling of a causal model: appending tokens after EOS changes nothing only if
    # they are masked; here we check the EOS token's state is what is returned.
    import torch

    ids_t, mask = llama_encoder.tokenizer.collate([ids])
    with torch.inference_mode():
        hidden = llama_encoder.model(input_ids=ids_t, attention_mask=mask).last_hidden_state
    last = int(mask[0].sum()) - 1  # the EOS position; the width is bucketed to 8 with padding
    assert last == len(ids) - 1
    expected = torch.nn.functional.normalize(hidden[0, last].float(), dim=-1).numpy()
    np.testing.assert_allclose(llama_encoder.core([ids])[0], expected, atol=1e-5)


def test_empty_encode_and_warmup(encoder: HFEncoder) -> None:
    assert encoder.encode([], "item").shape == (0, 32)
    encoder.warmup()


def test_fake_encoder_is_deterministic_and_word_based() -> None:
    enc = FakeEncoder(dim=16)
    a = enc.encode(["Dark roast coffee", "dark ROAST coffee!", "space opera"], "query")
    assert enc.calls == 1 and enc.batch_sizes == [3]
    np.testing.assert_allclose(a[0], a[1], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert a[0] @ a[2] < 0.9
    b = FakeEncoder(dim=16).encode(["Dark roast coffee"], "query")
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)


def test_max_length_is_cut_to_the_models_positions(tiny_bert_dir: Path) -> None:
    """A 128-position BERT under the default max_length 256: a 400-word history keeps its most
    recent 128 tokens (as max_length=128 would), instead of failing in the position lookup."""
    long = "; ".join(f"Groceries: coffee number {i}" for i in range(100))
    cut = HFEncoder(tiny_bert_dir, "mean", False, max_length=256, device="cpu", dtype="float32")
    exact = HFEncoder(tiny_bert_dir, "mean", False, max_length=128, device="cpu", dtype="float32")
    assert cut.tokenizer.max_length == 128
    np.testing.assert_allclose(
        cut.encode([long, "coffee"], "query"), exact.encode([long, "coffee"], "query"), atol=1e-6
    )
