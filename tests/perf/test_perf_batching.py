"""Dynamic batching returns the vectors the unbatched path returns (issue 5 optimisations).

The batcher coalesces concurrent requests and, with ``max_padding`` set (the CPU default), sorts a
batch by length and splits it into forwards with bounded padding; both must be invisible in the
vectors: within 1e-5 cosine of one-at-a-time encoding, in the right order.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from cprec.encoder import FakeEncoder, HFEncoder
from service.batcher import Batcher, padding_groups

TEXTS = [
    "Food: coffee",
    "Kitchen: a very long title about a cast iron skillet with a lid and a silicone handle "
    "holder, pre-seasoned, ten inch, oven safe; Food: dark roast coffee beans, two pounds",
    "Food: green tea bags; Kitchen: kettle",
    "Kitchen: oat milk frother with a stainless steel whisk and a stand",
    "Food: honey",
    "Food: organic wildflower honey; Food: espresso pods; Kitchen: grinder; Kitchen: scale; "
    "Food: decaf ground coffee; Kitchen: french press",
]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


async def _embed_all(enc, enabled: bool, max_padding: float | None) -> np.ndarray:  # type: ignore[no-untyped-def]
    b = Batcher(enc, max_batch_size=32, max_wait_ms=50.0, enabled=enabled, max_padding=max_padding)
    await b.start()
    try:
        return np.stack(await asyncio.gather(*(b.embed(t) for t in TEXTS)))  # [N, D]
    finally:
        await b.stop()


@pytest.mark.parametrize("max_padding", [None, 0.25, 0.0])
@pytest.mark.parametrize("model", ["tiny_bert_dir", "tiny_llama_dir"])
async def test_batched_equals_unbatched(
    model: str, max_padding: float | None, request: pytest.FixtureRequest
) -> None:
    path: Path = request.getfixturevalue(model)
    is_dec = model == "tiny_llama_dir"
    enc = HFEncoder(
        path, pooling="last" if is_dec else "mean", is_decoder=is_dec, device="cpu", dtype="float32"
    )
    single = np.stack([enc.core(enc.pre([t], "query"))[0] for t in TEXTS])
    batched = await _embed_all(enc, enabled=True, max_padding=max_padding)
    unbatched = await _embed_all(enc, enabled=False, max_padding=max_padding)
    assert _cos(batched, single).min() >= 1 - 1e-5
    assert _cos(unbatched, single).min() >= 1 - 1e-5


def test_split_bounds_padding_and_covers_every_row_once() -> None:
    batch = [[0] * n for n in (200, 12, 256, 15, 250, 14, 60, 256)]
    groups = padding_groups([len(x) for x in batch], 0.25)
    assert sorted(i for g in groups for i in g) == list(range(len(batch)))
    for g in groups:
        lens = [len(batch[i]) for i in g]
        assert max(lens) * len(lens) <= 1.25 * sum(lens)
    assert len(groups) > 1
    # no limit: one forward in input order (the GPU default)
    assert padding_groups([len(x) for x in batch], None) == [list(range(len(batch)))]


def test_split_caps_padded_tokens_per_forward() -> None:
    """With max_tokens, no forward passes rows x width (a single longer row still runs), every
    row runs once, and the 25% padding rule still holds inside each group."""
    lengths = [256] * 20 + [100] * 10 + [3000]
    groups = padding_groups(lengths, 0.25, max_tokens=2048)
    assert [len(g) for g in groups] == [10, 8, 8, 4, 1]  # 8 x 256 = 2048; 3000 alone
    assert len(padding_groups(lengths, 0.25)) == 3  # without the cap: 100s, 256s, 3000
    rng = np.random.default_rng(3)
    lengths = [int(x) for x in rng.integers(20, 257, size=64)]
    groups = padding_groups(lengths, 0.25, max_tokens=2048)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        lens = [lengths[i] for i in g]
        assert max(lens) * len(lens) <= min(2048, 1.25 * sum(lens))


async def test_split_forwards_keep_request_order() -> None:
    enc = FakeEncoder(dim=16)
    vecs = await _embed_all(enc, enabled=True, max_padding=0.0)
    want = enc.core(enc.pre(TEXTS, "query"))
    assert np.allclose(vecs, want, atol=1e-6)
    assert max(enc.batch_sizes[:-1]) < len(TEXTS)  # the coalesced batch was split


@pytest.mark.parametrize(("setting", "expected"), [(None, 0.25), ("none", None), ("0.1", 0.1)])
async def test_engine_splits_batches_by_default_on_cpu(app_client, setting, expected) -> None:  # type: ignore[no-untyped-def]
    """The CPU default (``batch_max_padding=auto``) is length-sorted split forwards."""
    kw = {} if setting is None else {"batch_max_padding": setting}
    async with app_client(**kw) as (_client, engine, _enc):
        assert engine.batcher.max_padding == expected


@pytest.mark.parametrize(("setting", "expected"), [(None, 2048), ("none", None), ("512", 512)])
async def test_engine_caps_forward_tokens_by_default_on_cpu(app_client, setting, expected) -> None:  # type: ignore[no-untyped-def]
    kw = {} if setting is None else {"batch_max_forward_tokens": setting}
    async with app_client(**kw) as (_client, engine, _enc):
        assert engine.batcher.max_forward_tokens == expected


def test_forward_tokens_setting_resolves_per_device() -> None:
    from service.settings import Settings

    assert Settings().tuning.for_device("cpu").batch_max_forward_tokens == 2048
    # one padded forward on a GPU
    assert Settings().tuning.for_device("cuda").batch_max_forward_tokens is None
    with pytest.raises(ValueError, match="batch_max_forward_tokens"):
        Settings(tuning={"batch_max_forward_tokens": 0})


class _CountingTokenizer(FakeEncoder):
    def __init__(self) -> None:
        super().__init__(dim=16)
        self.pre_calls: list[int] = []

    def pre(self, texts, kind):  # type: ignore[no-untyped-def]
        self.pre_calls.append(len(texts))
        return super().pre(texts, kind)


@pytest.mark.parametrize("enabled", [True, False])
async def test_a_ticks_histories_are_tokenised_together(enabled: bool) -> None:
    """32 histories arriving in one tick take one tokenizer call per pool thread (two blocks
    of 16), not 32 thread-pool hops; each request still gets its own text's vector."""
    enc = _CountingTokenizer()
    texts = [f"{TEXTS[i % len(TEXTS)]}; Food: item {i}" for i in range(32)]
    b = Batcher(enc, max_batch_size=32, max_wait_ms=5.0, enabled=enabled)
    await b.start()
    try:
        got = np.stack(await asyncio.gather(*(b.embed(t) for t in texts)))
        assert sorted(enc.pre_calls) == [16, 16]
        np.testing.assert_allclose(got, enc.encode(texts, "query"), atol=1e-6)
        enc.pre_calls.clear()
        await b.embed(texts[0])  # a lone request is tokenised at once, alone
        assert enc.pre_calls == [1]
    finally:
        await b.stop()
