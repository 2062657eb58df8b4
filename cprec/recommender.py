"""A whole recommender, one definition for training and serving: the LM that turns item texts
into vectors, and the user encoder that turns a history into the vector the items are ranked by.

Kinds and the scorer each is served with:

- ``flat`` (LLM-Rec's dual encoder), scorer ``text``: the LM encodes the whole history text
  (``Template.render_history``); the index holds the LM vectors of the item texts.
- ``hier``, scorer ``hier``: ``cprec.hier.HierRec`` maps the items' LM vectors to item vectors
  (the index rows) and reads a history of them (``HierRec.encode_histories``).
- a base LM that was never trained is served zero-shot, scorer ``mean`` (``zero_shot_items`` /
  ``zero_shot_query`` over the items' LM vectors) or ``text`` (as ``flat``).

``hier`` and ``mean`` keep every catalogue item's LM vector, so a history given by item id needs
no LM forward. One folder holds a recommender: the LM's HF files at its root, ``hier/`` for a
``hier`` model (``HierRec.save_pretrained``) and ``recommender.json`` (:class:`RecommenderConfig`).
A model-store version is that folder plus its manifest; a version published before
``recommender.json`` existed is read from the manifest's fields of the same names.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from cprec.encoder import Encoder, HFEncoder
from cprec.hier import (
    CONFIG_FILE,
    RESIDUAL_IDS_FILE,
    WEIGHTS_FILE,
    HierRec,
    is_hier_dir,
    zero_shot_items,
)
from cprec.lm import LMSource, Pooling, resolve_base_model
from cprec.text import Template

Kind = Literal["flat", "hier"]
Scorer = Literal["text", "hier", "mean"]
CONFIG = "recommender.json"
STORE_MANIFEST = "manifest.json"  # a model-store version's manifest, read for older artifacts
HIER_DIR = "hier"  # a hier model's HierRec folder, beside the LM at the folder's root
ROWS_CHUNK = 8192  # items per item_vectors call: bounds the float32 buffers of a big catalogue


class ArtifactFormatError(ValueError):
    """A recommender folder is incomplete or inconsistent; ``file`` names the offending file."""

    def __init__(self, message: str, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


class RecommenderConfig(BaseModel):
    """What loading a recommender needs; ``recommender.json``, and the model fields of a store
    manifest (``model_store.Manifest`` carries the same names)."""

    model_config = ConfigDict(extra="ignore")

    kind: Kind = "flat"
    base_model: str = Field(description="Bundled name or path of the LM it was trained from.")
    pooling: Pooling
    is_decoder: bool = False
    dim: int = Field(description="Size of a user vector and of an index row.")
    max_length: int = Field(default=256, description="Tokens per text the LM reads.")
    template: dict[str, Any] = Field(default_factory=dict, description="cprec.text.Template dump.")

    def manifest_fields(self) -> dict[str, Any]:
        return self.model_dump()


@dataclass(frozen=True, slots=True)
class HistoryVectors:
    """One history for ``hier``: [T, text_dim] LM vectors (oldest first), the catalogue item id
    of each entry (None for a title not in the catalogue: no residual) and its domain."""

    vecs: np.ndarray
    item_ids: list[str | None]
    domains: list[str]


class Recommender:
    """An encoder for texts plus the user model of its ``scorer``; see the module docstring.

    Every method that runs torch (``item_rows`` for hier, ``users``, ``warmup``) belongs on the
    thread that runs the model's forwards (the service's device thread).
    """

    def __init__(
        self,
        encoder: Encoder,
        version: str,
        template: Template | None = None,
        scorer: Scorer | None = None,
        hier: HierRec | None = None,
        config: RecommenderConfig | None = None,
        lm_dir: Path | None = None,
    ) -> None:
        self.encoder = encoder
        self.version = version
        self.template = template or Template()
        self.hier = hier
        self.scorer: Scorer = scorer or ("hier" if hier is not None else "text")
        if self.scorer == "hier" and hier is None:
            raise ValueError("scorer 'hier' needs a HierRec")
        if hier is not None and hier.cfg.text_dim != encoder.dim:
            raise ArtifactFormatError(
                f"HierRec text_dim {hier.cfg.text_dim} but the LM pools {encoder.dim}-d vectors",
                f"{HIER_DIR}/{CONFIG_FILE}",
            )
        self.config = config
        self.lm_dir = lm_dir

    # -- what the index and the users are made of --------------------------------------------
    @property
    def user_dim(self) -> int:
        """Size of a user query and of an index row."""
        if self.hier is not None:
            return self.hier.cfg.dim
        return self.encoder.dim + (1 if self.scorer == "mean" else 0)  # mean: popularity column

    @property
    def keeps_lm_vectors(self) -> bool:
        """Index rows are derived from the LM vectors (hier, mean), which are kept beside them."""
        return self.scorer != "text"

    @property
    def history_len(self) -> int:
        """Most recent history entries a user is made of."""
        return self.hier.cfg.max_len if self.hier is not None else self.template.max_items

    def lm_text(self, domain: str, title: str, extra_text: str | None = None) -> str:
        """The text the LM encodes for a catalogue item: for ``text`` the item text with its
        extra text (what flat training encodes); for hier and mean the item as one step of a
        history, the text their history entries and training use."""
        text = self.template.render_item(domain, title)
        if self.scorer == "text" and extra_text:
            return f"{text} {extra_text}"
        return text

    def item_rows(
        self, lm_vecs: np.ndarray, item_ids: Sequence[str], popularity: Sequence[float]
    ) -> np.ndarray:
        """[N, text_dim] LM vectors of catalogue items -> [N, user_dim] index rows (hier: the
        residual by item id; mean: a popularity column)."""
        if self.scorer == "text":
            return lm_vecs
        if self.scorer == "mean":
            return zero_shot_items(lm_vecs, popularity)
        assert self.hier is not None
        n = lm_vecs.shape[0]
        out = np.empty((n, self.hier.cfg.dim), dtype=np.float32)
        dev = _device(self.hier)
        rows = self.hier.residual_rows_for(list(item_ids))  # [N], 0 = never seen in training
        with torch.inference_mode():
            for s in range(0, n, ROWS_CHUNK):
                e = min(n, s + ROWS_CHUNK)
                x = torch.from_numpy(np.ascontiguousarray(lm_vecs[s:e], dtype=np.float32))
                out[s:e] = self.hier.item_vectors(x.to(dev), rows[s:e].to(dev)).float().cpu()
        return out

    def users(self, histories: Sequence[HistoryVectors]) -> np.ndarray:
        """``hier``: a batch of histories (each 1..max_len entries) -> [B, dim] user vectors,
        through ``encode_histories`` (right padding never reaches a real position: attention
        is causal and each user is read at its last real entry)."""
        assert self.hier is not None, "users() is the hier scorer's"
        model = self.hier
        b = len(histories)
        lens = [len(h.domains) for h in histories]
        t = max(lens)
        text = np.zeros((b, t, model.cfg.text_dim), dtype=np.float32)  # [B, T, text_dim]
        rows = np.zeros((b, t), dtype=np.int64)  # [B, T], 0 = no residual / padding
        doms = np.zeros((b, t), dtype=np.int64)  # [B, T], 0 = unknown domain / padding
        # Filled in numpy, then one tensor each: a torch op per history costs more than the
        # whole fill (this runs once per tick for every cache-miss request).
        row_of, dom_of = model.residual_row, model.domain_index
        for i, h in enumerate(histories):
            n = lens[i]
            text[i, :n] = h.vecs
            rows[i, :n] = [0 if x is None else row_of.get(x, 0) for x in h.item_ids]
            doms[i, :n] = [dom_of.get(d, 0) for d in h.domains]
        dev = _device(model)
        with torch.inference_mode(), _one_thread_on_cpu(dev):
            u = model.encode_histories(
                torch.from_numpy(text).to(dev),
                torch.from_numpy(rows).to(dev),
                torch.from_numpy(doms).to(dev),
                torch.tensor(lens, dtype=torch.long, device=dev),
            )  # [B, dim]
        return u.float().cpu().numpy()  # type: ignore[no-any-return]

    def warmup(self) -> None:
        """One forward of each part, so the first request pays for no lazy initialisation."""
        self.encoder.warmup()
        if self.hier is not None:
            zero = np.zeros((1, self.encoder.dim), np.float32)
            self.users([HistoryVectors(zero, [None], [""])])

    def files(self, folder: Path) -> list[str]:
        """The files of ``folder`` this class reads itself (relative paths); the LM's own files
        are read by transformers. A store checks each against its checksums."""
        out = [CONFIG] if (folder / CONFIG).is_file() else []
        if self.hier is not None:
            out += [f"{HIER_DIR}/{n}" for n in (CONFIG_FILE, WEIGHTS_FILE, RESIDUAL_IDS_FILE)]
        return out

    # -- one folder ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        version: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        quantize: str = "none",
    ) -> Recommender:
        """Load a recommender folder (a training output or a store version's directory)."""
        folder = Path(folder)
        cfg, manifest = read_config(folder)
        version = version or str(manifest.get("version") or folder.name)
        enc = HFEncoder(
            folder,
            pooling=cfg.pooling,
            is_decoder=cfg.is_decoder,
            max_length=cfg.max_length,
            device=device,
            dtype=dtype,
            name=f"store:{version}",
            quantize=quantize,
        )
        template = Template.model_validate(cfg.template) if cfg.template else Template()
        hier = None
        if cfg.kind == "hier":
            hier = _load_hier(folder, cfg, enc)
        return cls(enc, version, template, hier=hier, config=cfg, lm_dir=folder)

    @classmethod
    def from_base(
        cls,
        name: str,
        cache_dir: Path,
        *,
        zero_shot: Scorer = "mean",
        max_length: int = 256,
        history_max_items: int = 20,
        device: str = "auto",
        dtype: str = "auto",
        quantize: str = "none",
    ) -> Recommender:
        """A base LM (bundled name or local HF folder) served zero-shot with ``zero_shot``."""
        src: LMSource = resolve_base_model(name, cache_dir)
        enc = HFEncoder.from_source(
            src, max_length=max_length, device=device, dtype=dtype, quantize=quantize
        )
        template = Template(max_items=history_max_items)
        cfg = RecommenderConfig(
            base_model=name,
            pooling=src.pooling,
            is_decoder=src.is_decoder,
            dim=enc.dim,
            max_length=enc.tokenizer.max_length,
            template=template.model_dump(),
        )
        return cls(enc, src.version, template, zero_shot, config=cfg, lm_dir=src.path)

    def save_pretrained(self, folder: str | Path) -> Path:
        if self.lm_dir is None or self.config is None:
            raise ValueError("only a recommender loaded from a folder or a base can be saved")
        return save_pretrained(folder, self.lm_dir, self.config, self.hier)


def save_pretrained(
    folder: str | Path, lm_dir: Path, config: RecommenderConfig, hier: HierRec | None = None
) -> Path:
    """Write a recommender folder: the LM's files from ``lm_dir`` (unless it is ``folder``),
    ``hier/`` and ``recommender.json``; :meth:`Recommender.from_pretrained` reads it back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (config.kind == "hier") != (hier is not None):
        raise ValueError(f"kind {config.kind!r} with{'out' if hier is None else ''} a HierRec")
    if Path(lm_dir).resolve() != folder.resolve():
        skip = {CONFIG, STORE_MANIFEST, "manifest.sha256"}
        for f in sorted(Path(lm_dir).rglob("*")):
            rel = f.relative_to(lm_dir)
            if f.is_file() and rel.parts[0] != HIER_DIR and f.name not in skip:
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, folder / rel)
    if hier is not None:
        hier.save_pretrained(folder / HIER_DIR)
    (folder / CONFIG).write_text(config.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return folder


def read_config(folder: Path) -> tuple[RecommenderConfig, dict[str, Any]]:
    """(the config, the store manifest's raw fields or {}) of a recommender folder."""
    manifest: dict[str, Any] = {}
    if (folder / STORE_MANIFEST).is_file():
        manifest = json.loads((folder / STORE_MANIFEST).read_text(encoding="utf-8"))
    source = folder / CONFIG if (folder / CONFIG).is_file() else folder / STORE_MANIFEST
    if not source.is_file():
        raise ArtifactFormatError(
            f"{folder}: neither {CONFIG} nor a store {STORE_MANIFEST}; save the model with "
            "cprec.recommender.save_pretrained",
            CONFIG,
        )
    raw = manifest if source.name == STORE_MANIFEST else json.loads(source.read_text("utf-8"))
    if raw.get("kind", "flat") not in ("flat", "hier"):
        raise ArtifactFormatError(
            f"{source}: unknown model kind {raw.get('kind')!r}; known: flat, hier", source.name
        )
    return RecommenderConfig.model_validate(raw), manifest


def _load_hier(folder: Path, cfg: RecommenderConfig, encoder: Encoder) -> HierRec:
    """The HierRec under ``hier/``, on the encoder's device, checked against the LM and the
    config's dimension."""
    path = folder / HIER_DIR
    if not is_hier_dir(path):
        raise ArtifactFormatError(
            f"{path / CONFIG_FILE}: missing; a kind 'hier' model keeps its HierRec under "
            f"{HIER_DIR}/ (HierRec.save_pretrained)",
            f"{HIER_DIR}/{CONFIG_FILE}",
        )
    model = HierRec.from_pretrained(path, device=getattr(encoder, "device", "cpu"))
    if model.cfg.text_dim != encoder.dim:
        raise ArtifactFormatError(
            f"{path / CONFIG_FILE}: text_dim {model.cfg.text_dim} but the LM pools "
            f"{encoder.dim}-d vectors",
            f"{HIER_DIR}/{CONFIG_FILE}",
        )
    if model.cfg.dim != cfg.dim:
        name = CONFIG if (folder / CONFIG).is_file() else STORE_MANIFEST
        raise ArtifactFormatError(
            f"{folder / name}: dim {cfg.dim} but the HierRec has dim {model.cfg.dim}", name
        )
    return model


def _device(model: HierRec) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """The user model on one intra-op thread: its ops are too small to gain from a second one,
    and a thread team waiting at each op's barrier for a core the event loop holds made the
    forward many times slower (docs/decisions/006-serving-hier.md). The calling thread's
    setting is restored, so the LM's forwards keep theirs."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
