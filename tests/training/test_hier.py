"""The hierarchical model and its training on tiny synthetic data (no LM: random text vectors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cprec.hier import (
    ZS_POP_WEIGHT,
    HierConfig,
    HierRec,
    recency_weights,
    zero_shot_items,
    zero_shot_query,
)
from training.dataset import Case, Dataset, Item, TrainSeq
from training.hier import (
    Corpus,
    HierTrainConfig,
    Source,
    Trainer,
    domain_subsequences,
    make_batches,
    train_hier,
    windows,
)

N = 120  # items 0..59 domain A, 60..119 domain B
TEXT_DIM = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def cyclic(n_users: int, seed: int = 0, length: int = 9) -> list[list[int]]:
    """Users walk a fixed cycle over the items (next = current + 1 mod N)."""
    rng = np.random.default_rng(seed)
    return [[(int(s) + k) % N for k in range(length)] for s in rng.integers(0, N, n_users)]


def dom(i: int) -> str:
    return "A" if i < N // 2 else "B"


def corpus(n_users: int = 150, extra_source: bool = False) -> Corpus:
    items = [Item(i, dom(i), f"item {i}") for i in range(N)]
    seqs = cyclic(n_users)
    train = [TrainSeq(f"u{k}", s[:-2], [dom(i) for i in s[:-2]]) for k, s in enumerate(seqs)]
    valid = [Case(f"u{k}", s[:-2], s[-2], dom(s[-2])) for k, s in enumerate(seqs)]
    test = [Case(f"u{k}", s[:-1], s[-1], dom(s[-1])) for k, s in enumerate(seqs)]
    tgt = Dataset(items=list(items), train=train, valid=valid, test=test)
    src = Source("t", 0, N, mixed=[t.item_ids for t in train], domain=domain_subsequences(train))
    keys = [str(i) for i in range(N)]
    sources = [src]
    if extra_source:  # a second dataset: 20 items of domain C, reversed walks
        items += [Item(N + i, "C", f"c {i}") for i in range(20)]
        keys += [f"x:{i}" for i in range(20)]
        s2 = Source("x", N, N + 20, mixed=[[N + (7 - k) % 20 for k in range(6)]] * 30)
        sources.append(s2)
    domains = sorted({it.domain for it in items})
    item_domain = np.array([domains.index(it.domain) for it in items])
    return Corpus(items, keys, domains, item_domain, sources, tgt)


def text_for(c: Corpus, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    v = g.normal(size=(len(c.items), TEXT_DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def small_cfg(**kw) -> HierTrainConfig:  # type: ignore[no-untyped-def]
    base = {
        "model": {"dim": 16, "ffn": 32, "dropout": 0.1, "attn_dropout": 0.1, "max_len": 8},
        "pretrain": {"epochs": 3, "lr": 5e-3},
        "finetune": {"max_epochs": 3, "lr": 3e-3, "patience": 3},
        "batch_targets": 64,
        "progress": False,
        "bf16": False,
    }
    for k, v in kw.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return HierTrainConfig.model_validate(base)


def test_windows_hold_every_pair_once() -> None:
    seqs = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10]]
    inp, tgt = windows(seqs, max_len=4)
    pairs = set()
    for x, y in zip(inp, tgt, strict=True):
        for t in range(len(y)):
            if y[t] >= 0:
                pairs.add((tuple(int(v) for v in x[: t + 1] if v >= 0), int(y[t])))
    want = set()
    for s in seqs:
        for t in range(1, len(s)):
            want.add((tuple(s[max(0, t - 4) : t]), s[t]))
    assert pairs == want
    assert int((tgt >= 0).sum()) == len(want)  # no pair twice


def test_domain_subsequences_split_mixed_users_only() -> None:
    seqs = [
        TrainSeq("a", [1, 40, 2, 41, 3], ["A", "B", "A", "B", "A"]),
        TrainSeq("b", [1, 2], ["A"] * 2),
    ]
    assert domain_subsequences(seqs) == [[1, 2, 3], [40, 41]]


def test_every_position_is_its_prefix() -> None:
    """One forward trains all prefixes: the state at t equals the last state of items 0..t."""
    torch.manual_seed(0)
    m = HierRec(HierConfig(text_dim=TEXT_DIM, dim=16, ffn=32, max_len=8, domains=["A", "B"])).eval()
    x = torch.randn(1, 6, 16)
    d = torch.tensor([[1, 2, 1, 1, 2, 2]])
    full = m.states(x, d)
    for t in range(6):
        alone = m.states(x[:, : t + 1], d[:, : t + 1])[:, -1]
        torch.testing.assert_close(full[:, t], alone, atol=1e-5, rtol=1e-5)


def test_domain_softmax_equals_masked_full_softmax() -> None:
    c = corpus(40)
    tr = Trainer(
        HierRec(HierConfig(text_dim=TEXT_DIM, dim=16, ffn=32, max_len=8, domains=c.domains)),
        c,
        torch.from_numpy(text_for(c)),
        "domain",
    )
    tr.model.eval()
    inp, tgt = windows(c.sources[0].mixed, 8)
    b = make_batches(inp, tgt, 0, 10_000, np.random.default_rng(0))[0]
    got, n = tr.loss(b)
    # reference: full logits with other-domain columns at -inf
    table = tr.table(0, N)
    x = torch.from_numpy(b.inputs)
    pad = x < 0
    e = table[x.clamp(min=0)] * (~pad).unsqueeze(-1)
    dm = tr.dom_map[tr.item_dom[x.clamp(min=0)]].masked_fill(pad, 0)
    s = tr.model.states(e, dm)[torch.from_numpy(b.targets) >= 0]
    y = torch.from_numpy(b.targets)[torch.from_numpy(b.targets) >= 0]
    logits = s @ table.T
    other = tr.item_dom[None, :N] != tr.item_dom[y][:, None]
    ref = F.cross_entropy(logits.masked_fill(other, float("-inf")), y)
    assert n == len(y)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_training_learns_and_wsa_anneals_on_the_target() -> None:
    c = corpus(extra_source=True)
    cfg = small_cfg()
    res = train_hier(cfg, c, text_for(c), c.target.valid)
    ranked = res.trainer.rank(c.target.test)
    hits = np.mean([cs.target in r[:10] for r, cs in zip(ranked, c.target.test, strict=True)])
    assert hits > 0.9, hits  # a deterministic cycle is learnt
    pre = res.curves["pretrain"]
    assert pre[0]["lr"] < cfg.pretrain.lr  # warm-up
    assert pre[-1]["lr"] == pytest.approx(cfg.pretrain.lr * cfg.pretrain.schedule.min_ratio)
    assert pre[-1]["loss"] < pre[0]["loss"]
    assert res.stages["pretrain"]["sources"] == {"t": 150 + len(c.sources[0].domain), "x": 30}
    assert res.best_valid == max(h["valid_ndcg10"] for h in res.history)


def test_no_residual_means_text_alone_and_new_items_get_none() -> None:
    c = corpus()
    res = train_hier(
        small_cfg(model={"id_residual": False}, pretrain={"enabled": False}),
        c,
        text_for(c),
        c.target.valid,
    )
    assert res.model.residual is None
    res2 = train_hier(small_cfg(), c, text_for(c), c.target.valid)
    m = res2.model
    assert m.residual_rows_for(["0", "119", "unknown"]).tolist()[2] == 0
    t = torch.from_numpy(text_for(c)[:3])
    rows = m.residual_rows_for(["unknown"] * 3)
    torch.testing.assert_close(m.item_vectors(t, rows), m.adapter(t))


def test_save_and_load_give_the_same_user_vectors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    c = corpus()
    res = train_hier(small_cfg(finetune={"max_epochs": 1}), c, text_for(c), c.target.valid)
    res.model.save_pretrained(tmp_path / "m")
    back = HierRec.from_pretrained(tmp_path / "m")
    assert back.residual_ids == res.model.residual_ids
    tv = torch.from_numpy(text_for(c))
    hist = torch.tensor([[3, 4, 5, 0], [70, 71, 0, 0]])
    lens = torch.tensor([3, 2])
    rows = back.residual_rows_for([str(int(i)) for i in hist.flatten()]).view_as(hist)
    doms = back.domain_ids([dom(int(i)) for i in hist.flatten()]).view_as(hist)
    with torch.inference_mode():
        a = res.model.eval().encode_histories(tv[hist], rows, doms, lens)
        b = back.encode_histories(tv[hist], rows, doms, lens)
    torch.testing.assert_close(a, b)
    # the trainer's offline user vectors are the same path
    u = res.trainer.user_vectors([[3, 4, 5], [70, 71]])
    np.testing.assert_allclose(u, a.numpy(), atol=1e-5)


def test_zero_shot_prefers_recent_target_domain_items_and_popularity() -> None:
    v = np.eye(4, dtype=np.float32)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x)

    q = zero_shot_query(v[[0, 1, 2]], ["A", "B", "A"], "A")
    w = recency_weights(2, 1.0)
    np.testing.assert_allclose(q[:-1], unit(w[0] * v[0] + w[1] * v[2]), rtol=1e-6)
    assert q[-1] == 1
    np.testing.assert_allclose(  # no target-domain item: all items
        zero_shot_query(v[[0, 1]], ["A", "B"], "C")[:-1], unit(w[0] * v[0] + w[1] * v[1]), rtol=1e-6
    )
    rows = zero_shot_items(v, np.array([0.0, 1.0, 10.0, 0.0]))
    assert rows[:, -1].tolist() == pytest.approx(
        [0.0, *(ZS_POP_WEIGHT * np.log1p([1.0, 10.0])), 0.0]
    )


@pytest.mark.parametrize("bf16", [False, True])
def test_explicit_cpu_device_gives_the_default_losses_bit_for_bit(bf16: bool) -> None:
    """``device="cpu"`` is the recipe's path unchanged: the same losses, dropout and Adam steps
    included, as a Trainer built without a device."""
    c = corpus(40)
    inp, tgt = windows(c.sources[0].mixed, 8)
    batches = make_batches(inp, tgt, 0, 64, np.random.default_rng(0))[:3]

    def losses(**kw: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        cfg = HierConfig(text_dim=TEXT_DIM, dim=16, ffn=32, max_len=8, domains=c.domains)
        tr = Trainer(HierRec(cfg), c, torch.from_numpy(text_for(c)), "domain", bf16=bf16, **kw)
        assert tr.device == torch.device("cpu") and tr.text.device.type == "cpu"
        opt = torch.optim.Adam(tr.model.parameters(), lr=1e-2)
        out = []
        for b in batches:
            loss, _ = tr.loss(b)
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.detach())
        return out

    default, explicit = losses(), losses(device="cpu")
    assert len(default) == 3
    for a, b in zip(default, explicit, strict=True):
        assert torch.equal(a, b), (a, b)


def test_device_setting_is_checked() -> None:
    """A typo in ``device`` fails at config load, not after the corpus and LM vectors are built."""
    from pydantic import ValidationError

    assert small_cfg().device == "cpu"
    assert small_cfg(device="cuda:1").device == "cuda:1"
    with pytest.raises(ValidationError):
        small_cfg(device="gpu")
