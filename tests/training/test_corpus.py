import numpy as np
from train_util import toy_data

from cprec.text import Template
from training.config import CorpusConfig
from training.corpus import build_corpus, sample_batch, whitespace_counter

T = Template(max_items=8)


def _build(**kw):
    data = toy_data()
    cfg = CorpusConfig(**{"context_length": 400, "mixed_ratio": 0.5, **kw})
    return data, *build_corpus(data, T, cfg, whitespace_counter)


def test_both_kinds_in_time_order():
    data, chunks, stats = _build(mixed_ratio=0.5)
    kinds = {c.kind for c in chunks}
    assert kinds == {"domain", "mixed"}
    assert (
        stats["by_kind"]["domain"]["sequences"] > 0 and stats["by_kind"]["mixed"]["sequences"] > 0
    )
    train = {s.user_id: s for s in data.data.train}
    items = data.data.items
    for c in chunks:
        seq = train[c.user_id].item_ids
        if c.kind == "mixed":
            assert c.item_ids == seq  # the whole sequence, in time order (fits one chunk here)
            assert len(c.domains) == 2
        else:
            assert c.item_ids == [i for i in seq if items[i].domain == c.domains[0]]
        # the text is the template rendering, oldest first
        assert c.text == T.render_sequence(
            __import__("cprec.text").text.Behaviour(items[i].domain, items[i].title)
            for i in c.item_ids
        )


def test_no_target_leakage():
    data, chunks, _ = _build(mixed_ratio=0.5)
    for case in data.data.valid + data.data.test:
        for c in chunks:
            if c.user_id == case.user_id:
                assert case.target not in c.item_ids
                assert data.data.items[case.target].title not in c.text


def test_deterministic_with_seed():
    _, a, _ = _build(seed=3)
    _, b, _ = _build(seed=3)
    _, c, _ = _build(seed=4)
    assert [x.text for x in a] == [x.text for x in b]
    assert [x.text for x in a] != [x.text for x in c]


def test_mix_ratio():
    _, only_dom, s0 = _build(mixed_ratio=0.0)
    assert {c.kind for c in only_dom} == {"domain"} and s0["by_kind"]["mixed"]["sequences"] == 0
    _, only_mix, _ = _build(mixed_ratio=1.0)
    assert {c.kind for c in only_mix} == {"mixed"}
    # in between nothing is dropped: the ratio applies when CPT samples batches
    _, quarter, s = _build(mixed_ratio=0.25)
    _, half, _ = _build(mixed_ratio=0.5)
    assert len(quarter) == len(half) == len(only_dom) + len(only_mix)


def test_sample_batch_follows_ratio():
    pools = {"domain": np.arange(0, 100), "mixed": np.arange(100, 110)}
    pick = sample_batch(pools, 0.25, 4000, np.random.default_rng(0))
    share = float(np.mean(pick >= 100))
    assert abs(share - 0.25) < 0.03  # the small mixed pool is drawn as often as asked
    assert set(sample_batch(pools, 0.0, 200, np.random.default_rng(1))) <= set(range(100))
    only_dom = {"domain": np.arange(5), "mixed": np.empty(0, dtype=int)}
    assert set(sample_batch(only_dom, 0.9, 50, np.random.default_rng(2))) <= set(range(5))


def test_chunking_respects_context_and_keeps_titles_whole():
    data, chunks, _ = _build(context_length=16, mixed_ratio=1.0)
    train = {s.user_id: s for s in data.data.train}
    per_user: dict[str, list[int]] = {}
    for c in chunks:
        assert c.n_tokens <= 16 - 1  # one token reserved for EOS
        per_user.setdefault(c.user_id, []).extend(c.item_ids)
    # chunks of one user, in corpus order, may be shuffled: compare as multisets, then order
    for uid, ids in per_user.items():
        assert sorted(ids) == sorted(train[uid].item_ids)
    assert any(len(c.item_ids) < len(train[c.user_id].item_ids) for c in chunks)
