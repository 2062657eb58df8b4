"""ItemIndex / IndexStore: exact search with exclusion, per-domain isolation, lifecycle, recall."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from service.catalog import Item
from service.index import IndexStore, ItemIndex


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _catalog(n_per: int = 50, dim: int = 16, seed: int = 0) -> tuple[list[Item], np.ndarray]:
    rng = np.random.default_rng(seed)
    items = [
        Item(f"{d}-{i}", d, f"{d} title {i}", None, float((i * 7) % 13))
        for d in ("A", "B", "C")
        for i in range(n_per)
    ]
    return items, _unit(rng, len(items), dim)


def _brute(
    items: list[Item], vecs: np.ndarray, domain: str, q: np.ndarray, k: int, exclude: set[int]
) -> list[int]:
    rows = [r for r, it in enumerate(items) if it.domain == domain and r not in exclude]
    scores = vecs[rows] @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return [rows[i] for i in order]


def test_search_matches_brute_force_with_exclusion() -> None:
    items, vecs = _catalog()
    idx = ItemIndex.build(items, vecs, "m1")
    rng = np.random.default_rng(1)
    for q in _unit(rng, 10, 16):
        a_rows = idx.rows_by_domain["A"]
        # Exclude the true top-5 of A plus rows of other domains (which must not eat the budget).
        top = _brute(items, vecs, "A", q, 5, set())
        exclude = set(top) | {int(r) for r in idx.rows_by_domain["B"][:20]}
        hits = idx.search("A", q[None], 10, exclude)[0]
        assert [r for r, _ in hits] == _brute(items, vecs, "A", q, 10, exclude)
        assert len(hits) == 10 and not (set(top) & {r for r, _ in hits})
        for r, s in hits:
            assert r in set(a_rows.tolist())
            assert s == pytest.approx(float(vecs[r] @ q), abs=1e-5)


def test_batched_queries_and_k_larger_than_domain() -> None:
    items, vecs = _catalog(n_per=5)
    idx = ItemIndex.build(items, vecs, "m1")
    qs = _unit(np.random.default_rng(2), 3, 16)
    out = idx.search("B", qs, 50, exclude={5})
    assert len(out) == 3
    for q, hits in zip(qs, out, strict=True):
        assert [r for r, _ in hits] == _brute(items, vecs, "B", q, 50, {5})
        assert len(hits) == 4


def test_per_domain_isolation() -> None:
    items, vecs = _catalog()
    idx = ItemIndex.build(items, vecs, "m1")
    assert idx.domains == ["A", "B", "C"]
    assert {idx.size(d) for d in idx.domains} == {50}
    q = vecs[idx.by_id["B-3"]]  # a B item's own vector
    for d in idx.domains:
        hits = idx.search(d, q[None], 5)[0]
        assert {items[r].domain for r, _ in hits} == {d}
    assert items[idx.search("B", q[None], 1)[0][0][0]].item_id == "B-3"


def test_most_popular_order_and_exclude() -> None:
    items, vecs = _catalog(n_per=13)
    idx = ItemIndex.build(items, vecs, "m1")
    top = idx.most_popular("C", 3)
    pops = [items[r].popularity for r in top]
    assert pops == sorted((it.popularity for it in items if it.domain == "C"), reverse=True)[:3]
    assert all(items[r].domain == "C" for r in top)
    assert idx.most_popular("C", 3, exclude={top[0]})[:2] == top[1:3]


def test_build_refuses_mismatch_and_duplicates() -> None:
    items, vecs = _catalog(n_per=2)
    with pytest.raises(ValueError, match="vectors"):
        ItemIndex.build(items, vecs[:-1], "m1")
    with pytest.raises(ValueError, match="duplicate"):
        ItemIndex.build(items + [items[0]], np.vstack([vecs, vecs[:1]]), "m1")


def test_by_title_lookup_is_normalised() -> None:
    items = [Item("x", "Books", "  The  Great\tBook "), Item("y", "Books", "Other")]
    idx = ItemIndex.build(items, _unit(np.random.default_rng(0), 2, 4), "m1")
    assert idx.by_title[("Books", "the great book")] == 0


def test_save_load_round_trip(tmp_path: Path) -> None:
    items, vecs = _catalog()
    items[0] = Item(items[0].item_id, "A", "Caf\u00e9 \u2615", "extra words", 3.5)
    idx = ItemIndex.build(items, vecs, "m1")
    path = idx.save(tmp_path)
    assert path.name == idx.version
    assert (tmp_path / "CURRENT").read_text().strip() == idx.version
    back = ItemIndex.load(path)
    assert back.version == idx.version and back.model_version == "m1"
    assert back.items == idx.items and back.domains == idx.domains
    np.testing.assert_array_equal(back.vectors, idx.vectors)
    q = _unit(np.random.default_rng(3), 1, 16)
    for d in idx.domains:
        assert back.search(d, q, 7, {1, 2}) == idx.search(d, q, 7, {1, 2})


def _store_with_two(tmp_path: Path) -> tuple[IndexStore, ItemIndex, ItemIndex]:
    store = IndexStore(tmp_path)
    items, vecs = _catalog()
    old = ItemIndex.build(items, vecs, "m1", version="old")
    store.save(old)
    time.sleep(0.01)
    new = ItemIndex.build(items[:30], vecs[:30], "m1", version="new")
    store.save(new)
    return store, old, new


def test_load_latest_prefers_current(tmp_path: Path) -> None:
    store, _, new = _store_with_two(tmp_path)
    assert store.load_latest().version == "new"  # type: ignore[union-attr]


def test_corrupt_snapshot_skipped_falls_back_to_previous(tmp_path: Path) -> None:
    store, old, new = _store_with_two(tmp_path)
    vec_file = tmp_path / "versions" / "new" / "vectors.npy"
    data = bytearray(vec_file.read_bytes())
    data[-1] ^= 0xFF
    vec_file.write_bytes(bytes(data))
    loaded = store.load_latest()
    assert loaded is not None and loaded.version == "old"
    assert len(loaded.items) == len(old.items)


def test_incomplete_or_unreadable_snapshots_skipped(tmp_path: Path) -> None:
    store, _, _ = _store_with_two(tmp_path)
    (tmp_path / "versions" / "new" / "manifest.json").write_text("{")
    assert store.load_latest().version == "old"  # type: ignore[union-attr]
    (tmp_path / "versions" / "old" / "domain-0.faiss").unlink()
    assert store.load_latest() is None


def test_tmp_leftovers_cleaned(tmp_path: Path) -> None:
    store, _, _ = _store_with_two(tmp_path)
    junk = tmp_path / "versions" / ".tmp-crashed-abc"
    junk.mkdir()
    (junk / "items.jsonl").write_text("half")
    assert store.load_latest().version == "new"  # type: ignore[union-attr]
    assert not junk.exists()
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == ["new", "old"]


def test_prune_keeps_newest(tmp_path: Path) -> None:
    store = IndexStore(tmp_path, keep=2)
    items, vecs = _catalog(n_per=3)
    for n in range(4):
        idx = ItemIndex.build(items, vecs, "m1", version=f"v{n}")
        store.save(idx)
        os.utime(tmp_path / "versions" / f"v{n}", (n + 1.0, n + 1.0))  # distinct mtimes
    names = sorted(p.name for p in (tmp_path / "versions").iterdir())
    assert names == ["v2", "v3"]
    assert store.load_latest().version == "v3"  # type: ignore[union-attr]


def test_hnsw_recall_at_10_vs_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(42)
    n, dim = 5000, 32
    items = [Item(f"i{i}", "D", f"t{i}") for i in range(n)]
    vecs = _unit(rng, n, dim)
    exact = ItemIndex.build(items, vecs, "m1", kind="flat")
    approx = ItemIndex.build(items, vecs, "m1", kind="hnsw", hnsw_m=16, ef_search=64)
    qs = _unit(rng, 200, dim)
    truth = exact.search("D", qs, 10)
    got = approx.search("D", qs, 10)
    recall = np.mean(
        [len({r for r, _ in g} & {r for r, _ in t}) / 10 for g, t in zip(got, truth, strict=True)]
    )
    assert recall >= 0.95, recall
    # The saved HNSW index comes back with the requested efSearch and the same answers.
    back = ItemIndex.load(approx.save(tmp_path), ef_search=64)
    assert back.kind == "hnsw"
    assert back.search("D", qs[:20], 10) == approx.search("D", qs[:20], 10)


def test_jsonl_catalogue_keeps_titles_with_unicode_line_separators():
    """U+2028/U+0085 are legal inside JSON strings; only "\\n" separates JSONL rows."""
    import json

    from service.catalog import parse_catalog

    rows = [
        {"item_id": "a", "domain": "D", "title": "first\u2028part"},
        {"item_id": "b", "domain": "D", "title": "x\x85y"},
    ]
    data = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode()
    items = parse_catalog(data, "jsonl")
    assert [it.item_id for it in items] == ["a", "b"]
