"""Per-domain FAISS indexes over item vectors: immutable snapshots, the live reference, search.

A request reads ``LiveIndex.current`` once and uses that snapshot throughout; a reindex builds a
new snapshot beside it and swaps the reference. Concurrent requests' searches of one snapshot
share one faiss call per domain (``SearchCoalescer``).

A snapshot owns the catalogue it was built from, the item vectors, and one index per domain whose
int64 ids are the catalogue rows. Snapshots never change after build: a reindex builds a new one
beside the live one and the engine swaps one reference.

On disk (``<root>/versions/<index_version>/``): ``items.jsonl``, ``vectors.npy`` (the rows the
indexes hold), ``text_vectors.npy`` (the items' LM vectors, where the scorer is not ``text``: see
``service/scorer.py``), one ``domain-<n>.faiss`` per domain and ``manifest.json`` (domains,
scorer, checksums, model version) written last; the directory is renamed into place, then
``CURRENT`` is moved. A crash mid-write leaves only a ``.tmp-*`` directory that the next start
removes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from cprec.text import normalise_title
from model_store import ArtifactError, publish_dir, verify, write_atomic
from service.batcher import TickBatcher
from service.cache import Hits
from service.catalog import Item
from service.storefiles import store_lock

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "hnsw"]


_SEARCH_THREADS = 0  # OpenMP threads per search call; 0 = faiss' default (all cores)


def configure_faiss(
    blas_threshold: int | None = None,
    database_bs: int | None = None,
    search_threads: int | None = None,
) -> None:
    """Route batched searches through BLAS (faiss' default threshold of 20 queries keeps batches
    of 16 on the slow path), and cap the OpenMP threads of each search (see ``search``)."""
    global _SEARCH_THREADS
    if search_threads is not None:
        _SEARCH_THREADS = search_threads
    if blas_threshold is not None:
        faiss.cvar.distance_compute_blas_threshold = blas_threshold
    if database_bs is not None:
        faiss.cvar.distance_compute_blas_database_bs = database_bs


def _new_faiss(dim: int, kind: IndexKind, hnsw_m: int, ef_search: int) -> faiss.Index:
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    hnsw = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = max(40, 2 * hnsw_m)
    hnsw.hnsw.efSearch = ef_search
    return faiss.IndexIDMap2(hnsw)


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass
class ItemIndex:
    """An immutable catalogue + vectors + per-domain FAISS indexes."""

    version: str
    model_version: str
    items: list[Item]
    vectors: np.ndarray  # [N, D] float32: the rows the FAISS indexes hold
    kind: IndexKind = "flat"
    # [N, text_dim] float32 LM vectors of the item texts, kept beside rows derived from them
    # (scorers hier and mean) so a reindex or a restart re-encodes nothing; None for text.
    text_vectors: np.ndarray | None = None
    scorer: str = "text"
    created_at: float = field(default_factory=time.time)
    by_id: dict[str, int] = field(init=False)
    by_title: dict[tuple[str, str], int] = field(init=False)
    rows_by_domain: dict[str, np.ndarray] = field(init=False)
    popular: dict[str, list[int]] = field(init=False)
    indexes: dict[str, faiss.Index] = field(init=False)
    on_gpu: bool = field(default=False, init=False)

    @classmethod
    def build(
        cls,
        items: Sequence[Item],
        vectors: np.ndarray,
        model_version: str,
        kind: IndexKind = "flat",
        hnsw_m: int = 32,
        ef_search: int = 128,
        version: str | None = None,
        use_gpu: bool = False,
        indexes: dict[str, faiss.Index] | None = None,
        text_vectors: np.ndarray | None = None,
        scorer: str = "text",
    ) -> ItemIndex:
        if len(items) != vectors.shape[0]:
            raise ValueError(f"{len(items)} items but {vectors.shape[0]} vectors")
        if text_vectors is not None and text_vectors.shape[0] != len(items):
            raise ValueError(f"{len(items)} items but {text_vectors.shape[0]} text vectors")
        self = cls(
            version=version
            or time.strftime("i%Y%m%d-%H%M%S-", time.gmtime()) + uuid.uuid4().hex[:6],
            model_version=model_version,
            items=list(items),
            vectors=np.ascontiguousarray(vectors, dtype=np.float32),
            kind=kind,
            text_vectors=None
            if text_vectors is None
            else np.ascontiguousarray(text_vectors, dtype=np.float32),
            scorer=scorer,
        )
        self.by_id = {}
        for row, it in enumerate(self.items):
            if it.item_id in self.by_id:
                raise ValueError(f"duplicate item_id {it.item_id!r}")
            self.by_id[it.item_id] = row
        # (domain, casefolded title) -> row: a history given as titles is excluded too.
        self.by_title = {
            (it.domain, normalise_title(it.title).casefold()): r for r, it in enumerate(self.items)
        }
        domains: dict[str, list[int]] = {}
        for row, it in enumerate(self.items):
            domains.setdefault(it.domain, []).append(row)
        self.rows_by_domain = {d: np.asarray(r, dtype=np.int64) for d, r in sorted(domains.items())}
        self.popular = {
            d: sorted(rows.tolist(), key=lambda r: (-self.items[r].popularity, r))
            for d, rows in self.rows_by_domain.items()
        }
        dim = self.vectors.shape[1]
        self.indexes = {}
        for d, rows in self.rows_by_domain.items():
            if indexes is not None and d in indexes:
                self.indexes[d] = indexes[d]
                continue
            idx = _new_faiss(dim, kind, hnsw_m, ef_search)
            idx.add_with_ids(self.vectors[rows], rows)
            self.indexes[d] = idx
        if use_gpu and gpu_available() and kind == "flat":
            self._to_gpu()
        return self

    def _to_gpu(self) -> None:
        res = faiss.StandardGpuResources()
        self.indexes = {d: faiss.index_cpu_to_gpu(res, 0, i) for d, i in self.indexes.items()}
        self._gpu_res = res  # keep alive as long as the indexes
        self.on_gpu = True

    # -- queries -----------------------------------------------------------------------------
    @property
    def domains(self) -> list[str]:
        return list(self.rows_by_domain)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def lm_vectors(self) -> np.ndarray:
        """[N, text_dim] LM vectors of the items (the index rows themselves for ``text``)."""
        return self.vectors if self.text_vectors is None else self.text_vectors

    def size(self, domain: str) -> int:
        return int(self.rows_by_domain[domain].shape[0])

    def search(
        self, domain: str, queries: np.ndarray, k: int, exclude: Iterable[int] = ()
    ) -> list[list[tuple[int, float]]]:
        """Top-k (row, score) per query [Q, D] within ``domain``, excluded rows removed.

        Over-fetches by the number of excluded rows in this domain, so the answer stays exact.
        """
        excl = {r for r in exclude if self.items[r].domain == domain}
        n = self.size(domain)
        fetch = min(n, k + len(excl))
        if fetch == 0:
            return [[] for _ in range(queries.shape[0])]
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if _SEARCH_THREADS and not self.on_gpu:
            # Per calling thread (an OpenMP ICV), so the encoder's threads are untouched. Beside
            # a forward pass that already uses every core, faiss' spinning OpenMP team stalls
            # (docs/decisions/003-serving-on-two-cores.md).
            faiss.omp_set_num_threads(_SEARCH_THREADS)
        scores, ids = self.indexes[domain].search(q, fetch)  # [Q, fetch] each
        out: list[list[tuple[int, float]]] = []
        for srow, irow in zip(scores, ids, strict=True):
            hits = [
                (int(i), float(s))
                for s, i in zip(srow, irow, strict=True)
                if i >= 0 and int(i) not in excl
            ]
            out.append(hits[:k])
        return out

    def most_popular(self, domain: str, k: int, exclude: Iterable[int] = ()) -> list[int]:
        excl = set(exclude)
        return [r for r in self.popular[domain] if r not in excl][:k]

    # -- persistence -------------------------------------------------------------------------
    def save(self, root: Path) -> Path:
        """Write this snapshot under ``root/versions/<version>`` atomically, then move CURRENT."""

        def write(tmp: Path) -> dict[str, Any]:
            with open(tmp / "items.jsonl", "w", encoding="utf-8") as fh:
                for it in self.items:
                    fh.write(json.dumps(it.to_json(), ensure_ascii=False) + "\n")
            np.save(tmp / "vectors.npy", self.vectors)
            if self.text_vectors is not None:
                np.save(tmp / "text_vectors.npy", self.text_vectors)
            domain_files = {}
            for n, (d, idx) in enumerate(self.indexes.items()):
                cpu = faiss.index_gpu_to_cpu(idx) if self.on_gpu else idx
                domain_files[d] = f"domain-{n}.faiss"
                faiss.write_index(cpu, str(tmp / domain_files[d]))
            return {
                "version": self.version,
                "model_version": self.model_version,
                "kind": self.kind,
                "scorer": self.scorer,
                "dim": self.dim,
                "n_items": len(self.items),
                "domains": domain_files,
                "created_at": self.created_at,
                "complete": True,
            }

        final = publish_dir(root / "versions", self.version, write)
        write_atomic(root / "CURRENT", (self.version + "\n").encode())
        return final

    @classmethod
    def load(
        cls,
        path: Path,
        use_gpu: bool = False,
        ef_search: int | None = None,
        scorer: str | None = None,
    ) -> ItemIndex:
        """Load one saved snapshot after verifying every file's checksum; with ``scorer`` given,
        a snapshot built for another one is refused (its rows mean something else)."""
        manifest = verify(path, require_sum=False)  # snapshots of older versions have no sum
        if not manifest.get("complete"):
            raise ArtifactError(f"{path}: index is not marked complete", "manifest.json")
        built_for = manifest.get("scorer", "text")  # snapshots older than scorers: text
        if scorer is not None and built_for != scorer:
            raise ArtifactError(
                f"{path}: built for scorer {built_for!r}, not {scorer!r}", "manifest.json"
            )
        with open(path / "items.jsonl", encoding="utf-8") as fh:
            items = [Item.from_json(json.loads(line)) for line in fh]
        vectors = np.load(path / "vectors.npy")
        text_vectors = (
            np.load(path / "text_vectors.npy") if "text_vectors.npy" in manifest["files"] else None
        )
        indexes = {d: faiss.read_index(str(path / f)) for d, f in manifest["domains"].items()}
        if ef_search is not None and manifest["kind"] == "hnsw":
            for idx in indexes.values():
                idmap: Any = faiss.downcast_index(idx)
                inner: Any = faiss.downcast_index(idmap.index)
                inner.hnsw.efSearch = ef_search
        return cls.build(
            items,
            vectors,
            manifest["model_version"],
            kind=manifest["kind"],
            version=manifest["version"],
            use_gpu=use_gpu,
            indexes=indexes,
            text_vectors=text_vectors,
            scorer=built_for,
        )


class IndexStore:
    """Saved snapshots for one model version: load the newest complete one, prune old ones.

    Several processes (workers, replicas) may share one: ``CURRENT`` names the snapshot last
    published, writers take :meth:`writer` first (one at a time, across processes), and
    readers follow ``CURRENT`` (:meth:`current`, :meth:`load_version`)."""

    def __init__(self, root: Path, keep: int = 3) -> None:
        self.root = root
        self.keep = keep

    def current(self) -> str | None:
        """The version ``CURRENT`` names (None before the first save)."""
        try:
            return (self.root / "CURRENT").read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def load_version(
        self,
        version: str,
        use_gpu: bool = False,
        ef_search: int | None = None,
        scorer: str | None = None,
    ) -> ItemIndex:
        """One saved snapshot, verified (raises ArtifactError/OSError if it is not whole)."""
        return ItemIndex.load(
            self.root / "versions" / version, use_gpu=use_gpu, ef_search=ef_search, scorer=scorer
        )

    def writer(self) -> contextlib.AbstractAsyncContextManager[None]:
        """The store's one writer, across processes (``writer.lock``): builds, saves and
        partial-snapshot cleanup happen under it, so two processes never merge into, or clean
        up, each other's half-written work."""
        return store_lock(self.root / "writer.lock")

    def cleanup_partial(self) -> None:
        """Remove half-written snapshots left by a crash."""
        versions = self.root / "versions"
        if versions.is_dir():
            for p in versions.iterdir():
                if p.name.startswith(".tmp-"):
                    shutil.rmtree(p, ignore_errors=True)

    def candidates(self) -> list[Path]:
        """CURRENT first, then the other complete snapshots newest first."""
        versions = self.root / "versions"
        if not versions.is_dir():
            return []
        all_dirs = sorted(
            (p for p in versions.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        current = (
            (self.root / "CURRENT").read_text().strip()
            if (self.root / "CURRENT").is_file()
            else None
        )
        ordered = [p for p in all_dirs if p.name == current] + [
            p for p in all_dirs if p.name != current
        ]
        return ordered

    def load_latest(
        self, use_gpu: bool = False, ef_search: int | None = None, scorer: str | None = None
    ) -> ItemIndex | None:
        """The newest snapshot that verifies (and was built for ``scorer``, if given); a corrupt
        or foreign one is logged and skipped, never served."""
        self.cleanup_partial()
        for path in self.candidates():
            try:
                return ItemIndex.load(path, use_gpu=use_gpu, ef_search=ef_search, scorer=scorer)
            except (ArtifactError, OSError, ValueError, KeyError, RuntimeError) as exc:
                log.error("skipping index snapshot %s: %s", path, exc)
        return None

    def save(self, index: ItemIndex) -> None:
        index.save(self.root)
        self.prune(protect=index.version)

    def prune(self, protect: str) -> None:
        for path in self.candidates()[self.keep :]:
            if path.name != protect:
                shutil.rmtree(path, ignore_errors=True)


class LiveIndex:
    """The one reference readers use. A request reads ``current`` once and keeps that snapshot
    to the end, so a swap in the middle of a request never mixes two catalogues; readers take
    no lock, and writers are serialised by the reindex job's lock."""

    def __init__(self) -> None:
        self.current: ItemIndex | None = None
        self._on_swap: list[Callable[[ItemIndex], None]] = []

    def on_swap(self, hook: Callable[[ItemIndex], None]) -> None:
        """Run ``hook(new)`` right after every swap (e.g. empty a cache keyed by snapshot)."""
        self._on_swap.append(hook)

    def swap(self, index: ItemIndex) -> None:
        self.current = index
        for hook in self._on_swap:
            hook(index)


# -- search ---------------------------------------------------------------------------------


@dataclass
class _Search:
    idx: ItemIndex
    targets: Sequence[str]
    vec: np.ndarray  # [D]
    k: int
    exclude: set[int]


def search_many(searches: Sequence[_Search]) -> list[Hits]:
    """Exact top-k per search and target domain, one faiss call per (snapshot, domain).

    Each query block is fetched deep enough for its most demanding member (its k plus its
    excluded rows in that domain), then every row is filtered with its own exclusions and cut
    to its own k: the same answer as searching each request alone. One [B, D] block reads a
    flat index once where B single-vector searches read it B times.
    """
    out: list[Hits] = [{} for _ in searches]
    groups: dict[tuple[int, str], list[int]] = {}
    for i, s in enumerate(searches):
        for d in s.targets:
            groups.setdefault((id(s.idx), d), []).append(i)
    for (_, d), members in groups.items():
        idx = searches[members[0]].idx
        excl = [{r for r in searches[i].exclude if idx.items[r].domain == d} for i in members]
        fetch = max(searches[i].k + len(e) for i, e in zip(members, excl, strict=True))
        q = np.stack([searches[i].vec for i in members])  # [B, D]
        rows = idx.search(d, q, fetch)
        for i, e, hits in zip(members, excl, rows, strict=True):
            out[i][d] = [(r, s) for r, s in hits if r not in e][: searches[i].k]
    return out


class SearchCoalescer(TickBatcher[_Search, Hits]):
    """``await search(...)`` from many requests; those issued in one tick run as one batch.

    A large tick is cut into up to ``parts`` blocks of at least ``min_part`` queries, searched
    by parallel single-threaded faiss calls (faiss releases the GIL): right after a batch its
    clients' searches are all the next batch waits for, and one call used one core of two.
    Parallel calls, not an OpenMP team, which left the encoder's cores idle
    (docs/decisions/003-serving-on-two-cores.md).
    """

    def __init__(self, parts: int = 1, min_part: int = 8) -> None:
        super().__init__(self._search_block, parts, min_part)

    async def search(
        self, idx: ItemIndex, targets: Sequence[str], vec: np.ndarray, k: int, exclude: set[int]
    ) -> Hits:
        return await self(_Search(idx, targets, vec, k, exclude))

    @staticmethod
    async def _search_block(batch: list[_Search]) -> list[Hits]:
        return await asyncio.to_thread(search_many, batch)
