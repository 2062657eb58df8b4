"""FK-LOO reader against the published split (counts from its README)."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest

from training.fkloo import SHA256, FKLOOError, fkloo_dir, load_fkloo, verify

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (fkloo_dir() / "test.tsv.gz").exists(),
        reason="FK-LOO split not found (set CPREC_SHARED_DIR)",
    ),
]


@pytest.fixture(scope="module")
def data():
    return load_fkloo()


def test_counts_match_readme(data):
    assert len(data.items) == 36_298
    assert Counter(it.domain for it in data.items) == {"Food": 8_661, "Kitchen": 27_637}
    assert data.domain_items("Food").tolist() == list(range(8_661))
    assert data.domain_items("Kitchen")[0] == 8_661 and data.domain_items("Kitchen")[-1] == 36_297
    assert len(data.train) == 53_061
    assert sum(len(s.item_ids) for s in data.train) == 417_331
    assert all(len(s.item_ids) == len(s.domains) for s in data.train)
    assert Counter(c.domain for c in data.valid) == {"Food": 3_752, "Kitchen": 5_646}
    assert Counter(c.domain for c in data.test) == {"Food": 3_343, "Kitchen": 6_055}
    # every mixed user is a valid and a test case; test history = valid history + valid target
    v = {c.user_id: c for c in data.valid}
    for c in data.test[:500]:
        assert c.history == v[c.user_id].history + [v[c.user_id].target]
    assert sum(len(c.history) for c in data.test) / len(data.test) == pytest.approx(13.2, abs=0.05)


def test_quoted_titles_parsed(data):
    # items.tsv.gz uses CSV quoting: a QUOTE_NONE reader would leave quote characters around
    # some titles and split rows on embedded newlines (the id check would fail).
    assert all(it.item_id == i for i, it in enumerate(data.items))
    assert not any(it.title.startswith('"') and it.title.endswith('"') for it in data.items)


def test_subset_is_deterministic(data):
    a, b = load_fkloo(subset=200, seed=3), load_fkloo(subset=200, seed=3)
    assert [c.user_id for c in a.test] == [c.user_id for c in b.test]
    assert len(a.test) == len(a.valid) == 200
    assert {c.user_id for c in a.test} == {c.user_id for c in a.valid}
    assert len(a.train) == len(data.train)
    order = {c.user_id: i for i, c in enumerate(data.test)}
    idx = [order[c.user_id] for c in a.test]
    assert idx == sorted(idx)  # file order kept


def test_sha_mismatch_is_a_clear_error(tmp_path):
    verify(fkloo_dir())
    for name in SHA256:
        shutil.copy(fkloo_dir() / name, tmp_path / name)
    (tmp_path / "valid.tsv.gz").write_bytes(b"not the split")
    with pytest.raises(FKLOOError, match="valid.tsv.gz: sha256"):
        load_fkloo(tmp_path)
    (tmp_path / "valid.tsv.gz").unlink()
    with pytest.raises(FKLOOError, match="CPREC_SHARED_DIR"):
        load_fkloo(tmp_path)
