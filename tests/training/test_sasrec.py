"""SASRec on tiny synthetic data: shapes, padding invariance, and that it learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.dataset import Case, Item
from training.evaluate import compute_metrics
from training.sasrec import (
    SASRec,
    SASRecConfig,
    build_pairs,
    build_windows,
    encode_histories,
    fit,
    pack_batches,
    rank_sasrec,
    score_cases,
    valid_ndcg_fn,
)

N_ITEMS = 120
ITEMS = [Item(i, "A" if i < 60 else "B", f"t{i}") for i in range(N_ITEMS)]


pytestmark = pytest.mark.usefixtures("one_thread")


def cyclic_seqs(n: int, seed: int = 0) -> list[list[int]]:
    """Users walk a fixed cycle over the items (next = current + 1): perfectly predictable."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start, length = int(rng.integers(N_ITEMS)), int(rng.integers(4, 12))
        out.append([(start + t) % N_ITEMS for t in range(length)])
    return out


def small_cfg(**kw) -> SASRecConfig:
    base = dict(
        max_len=8,
        hidden=32,
        heads=2,
        ffn=64,
        dropout=0.1,
        attn_dropout=0.1,
        lr=5e-3,
        batch_size=64,
        max_epochs=5,
        patience=2,
        seed=1,
        progress=False,
    )
    base.update(kw)
    return SASRecConfig(**base)


def test_build_pairs_truncates_and_shifts():
    hist, lens, tg = build_pairs([[5, 6, 7], [1, 2, 3, 4, 9]], max_len=3)
    assert tg.tolist() == [6, 7, 2, 3, 4, 9]
    assert lens.tolist() == [1, 2, 1, 2, 3, 3]
    assert hist[1].tolist() == [6, 7, 0]  # shifted by one, left-aligned, 0 = padding
    assert hist[5].tolist() == [3, 4, 5]  # last 3 of [1, 2, 3, 4]


def test_windows_hold_exactly_the_pairs():
    seqs = [[5, 6, 7], [1, 2, 3, 4, 9, 8, 11], [3]]
    inputs, targets, n_t = build_windows(seqs, max_len=3)
    hist, lens, tg = build_pairs(seqs, max_len=3)
    from_windows = sorted(
        (tuple(inputs[w, max(0, t + 1 - 3) : t + 1]), int(targets[w, t]))
        for w in range(len(inputs))
        for t in range(3)
        if targets[w, t] >= 0
    )
    from_pairs = sorted((tuple(hist[p, : lens[p]]), int(tg[p])) for p in range(len(tg)))
    assert from_windows == from_pairs
    assert n_t.sum() == len(tg) == 8
    # pairs whose prefix is cut to max_len items get their own window (RecBole's truncation)
    assert inputs.tolist()[2] == [3, 4, 5] and targets.tolist()[2] == [-1, -1, 9]


def test_pack_batches_by_pair_count():
    n_t = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    batches = pack_batches(n_t, np.arange(8), 5)
    assert np.concatenate(batches).tolist() == list(range(8))
    sums = [int(n_t[b].sum()) for b in batches]
    assert all(x >= 5 for x in sums[:-1]) and sum(sums) == n_t.sum()


def test_window_states_equal_pair_states():
    torch.manual_seed(0)
    model = SASRec(N_ITEMS, small_cfg()).eval()
    seq = [4, 8, 15, 16, 23, 42]
    inputs, targets, _ = build_windows([seq], max_len=8)
    with torch.no_grad():
        all_states = model.forward_all(torch.from_numpy(inputs[:, :5]))[0]  # [5, H]
        for t in range(5):
            one = model(*encode_histories([seq[: t + 1]], max_len=8))[0]
            torch.testing.assert_close(all_states[t], one, rtol=1e-5, atol=1e-5)


def test_shapes_and_padding_invariance():
    torch.manual_seed(0)
    model = SASRec(N_ITEMS, small_cfg()).eval()
    seq, lens = encode_histories([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]], max_len=8)
    assert seq.shape == (2, 8) and lens.tolist() == [3, 8]
    state = model(seq, lens)
    assert state.shape == (2, 32)
    assert model.logits(state).shape == (2, N_ITEMS)
    # extra right padding does not change a user state (causal mask, left-aligned)
    alone = model(*encode_histories([[1, 2, 3]], max_len=8))
    torch.testing.assert_close(alone[0], state[0], rtol=1e-5, atol=1e-5)


def test_fit_learns_and_ranks():
    seqs = cyclic_seqs(200)
    cases = [
        Case(f"u{i}", s[:-1], s[-1], ITEMS[s[-1]].domain) for i, s in enumerate(cyclic_seqs(60, 9))
    ]
    res = fit(seqs, N_ITEMS, small_cfg(), eval_fn=valid_ndcg_fn(cases, ITEMS))
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0] * 0.7, losses
    assert res.best_valid > 0.3 and res.best_epoch >= 0
    assert res.pairs == sum(len(s) - 1 for s in seqs)
    ranked = rank_sasrec(res.model, cases, ITEMS)
    assert ranked and all(len(r) == 50 for r in ranked)
    m = compute_metrics(ranked, cases, ITEMS)
    assert abs(m["metrics"]["overall_micro"]["NDCG@10"] - res.best_valid) < 1e-9
    assert score_cases(res.model, cases[:3]).shape == (3, N_ITEMS)
