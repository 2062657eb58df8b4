"""How the served model turns LM vectors into index rows and user queries.

Three scorers, one per kind of served model:

- ``text``: a ``flat`` artifact (or ``CPREC_ZERO_SHOT=text`` on a base model). The LM encodes the
  whole history text; the index holds the LM vectors of the item texts.
- ``hier``: a ``hier`` artifact. The index holds ``HierRec.item_vectors`` of the items' LM
  vectors; a user is ``HierRec.encode_histories`` over the history items' LM vectors.
- ``mean``: the zero-shot default on a base model. The index holds ``zero_shot_items`` rows (LM
  vector + a popularity column); each target domain's query is ``zero_shot_user``.

``hier`` and ``mean`` keep the catalogue's LM vectors in the index snapshot, so a history given
by ``item_id`` needs no LM forward, and they read ``cprec.hier`` so the served vectors are the
ones the offline evaluator scores. Every torch call here runs on the device thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from cprec.hier import ZS_HALF_LIFE, HierRec, zero_shot_items

ScorerKind = Literal["text", "hier", "mean"]
SCORERS: tuple[ScorerKind, ...] = ("text", "hier", "mean")
ROWS_CHUNK = 8192  # items per item_vectors call: bounds the float32 buffers of a big catalogue


@dataclass(frozen=True, slots=True)
class HistoryVectors:
    """One history for ``hier``: [T, text_dim] LM vectors (oldest first), the catalogue item id
    of each entry (None for a title not in the catalogue: no residual) and its domain."""

    vecs: np.ndarray
    item_ids: list[str | None]
    domains: list[str]


def _device(model: HierRec) -> torch.device:
    return next(model.parameters()).device


def hier_item_rows(model: HierRec, lm_vecs: np.ndarray, item_ids: Sequence[str]) -> np.ndarray:
    """[N, text_dim] LM vectors of catalogue items -> [N, dim] index rows (residual by id)."""
    n = lm_vecs.shape[0]
    out = np.empty((n, model.cfg.dim), dtype=np.float32)
    if n == 0:
        return out
    dev = _device(model)
    rows = model.residual_rows_for(list(item_ids))  # [N], 0 = never seen in training
    with torch.inference_mode():
        for s in range(0, n, ROWS_CHUNK):
            e = min(n, s + ROWS_CHUNK)
            x = torch.from_numpy(np.ascontiguousarray(lm_vecs[s:e], dtype=np.float32)).to(dev)
            out[s:e] = model.item_vectors(x, rows[s:e].to(dev)).float().cpu().numpy()
    return out


def hier_user_vectors(model: HierRec, histories: Sequence[HistoryVectors]) -> np.ndarray:
    """A batch of histories (each 1..max_len entries) -> [B, dim] user vectors, through
    ``encode_histories`` (right padding never reaches a real position: the attention is
    causal and each user is read at its last real entry)."""
    b = len(histories)
    lens = [len(h.domains) for h in histories]
    t = max(lens)
    d = model.cfg.text_dim
    text = np.zeros((b, t, d), dtype=np.float32)  # [B, T, text_dim]
    rows = torch.zeros((b, t), dtype=torch.long)  # [B, T], 0 = no residual / padding
    doms = torch.zeros((b, t), dtype=torch.long)  # [B, T], 0 = unknown domain / padding
    for i, h in enumerate(histories):
        n = lens[i]
        text[i, :n] = h.vecs
        known = [(j, x) for j, x in enumerate(h.item_ids) if x is not None]
        if known:
            cols = [j for j, _ in known]
            rows[i, cols] = model.residual_rows_for([x for _, x in known])
        doms[i, :n] = model.domain_ids(h.domains)
    dev = _device(model)
    with torch.inference_mode():
        u = model.encode_histories(
            torch.from_numpy(text).to(dev),
            rows.to(dev),
            doms.to(dev),
            torch.tensor(lens, dtype=torch.long, device=dev),
        )  # [B, dim]
    return u.float().cpu().numpy()


def mean_item_rows(lm_vecs: np.ndarray, popularity: Sequence[float]) -> np.ndarray:
    """[N, D] LM vectors + catalogue popularity -> [N, D + 1] ``zero_shot_items`` rows."""
    if lm_vecs.shape[0] == 0:
        return np.zeros((0, lm_vecs.shape[1] + 1), dtype=np.float32)
    with torch.inference_mode():
        pop = torch.tensor(list(popularity), dtype=torch.float32)
        out = zero_shot_items(torch.from_numpy(np.ascontiguousarray(lm_vecs)), pop)
    return out.numpy().astype(np.float32, copy=False)


def zero_shot_query(lm_vecs: np.ndarray, domains: Sequence[str], target: str) -> np.ndarray:
    """``cprec.hier.zero_shot_user`` in numpy: [T, D] history LM vectors -> [D + 1] query.

    Runs on the event loop for every request, where a torch op would need a hop to the device
    thread and wait behind its forwards; tests/service/test_service_hier.py holds it to the
    torch definition."""
    pick = [i for i, d in enumerate(domains) if d == target]
    idx = pick or list(range(len(domains)))
    v = lm_vecs[idx].astype(np.float64)  # [n, D]
    age = np.arange(len(idx) - 1, -1, -1, dtype=np.float64)
    w = np.exp(-age * math.log(2.0) / max(ZS_HALF_LIFE, 1e-6))  # latest counts 1
    u = (w[:, None] * v).sum(0)
    u /= max(float(np.linalg.norm(u)), 1e-12)
    return np.concatenate([u, [1.0]]).astype(np.float32)
