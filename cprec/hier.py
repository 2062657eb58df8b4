"""The hierarchical CPRec model (kind ``hier``): one definition for training and serving.

An item is its text vector (the LM over ``<domain>: <title>``, pooled) through a small adapter,
plus an optional learned residual for items seen in training; a user is a causal transformer over
the history's item vectors (with position and domain embeddings), read at the last position.
Next-item prediction at every position makes one forward train every prefix of a sequence, which
is what lets this model learn on 2 CPU cores where the flat dual encoder could not.

The LM itself is not part of this module: the item text vectors come from ``cprec.lm`` (offline
in training, at index time in the service), so a history given by ``item_id`` needs no LM forward.
``save_pretrained`` / ``from_pretrained`` write and read one folder: ``hier_config.json``,
``hier.safetensors`` and ``residual_ids.json`` (the item ids of the residual table's rows).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CONFIG_FILE = "hier_config.json"
WEIGHTS_FILE = "hier.safetensors"
RESIDUAL_IDS_FILE = "residual_ids.json"


@dataclass
class HierConfig:
    """Shape and scoring of a ``hier`` model; saved beside its weights."""

    text_dim: int
    dim: int = 64
    layers: int = 2
    heads: int = 2
    ffn: int = 256
    dropout: float = 0.5
    attn_dropout: float = 0.5
    max_len: int = 50
    domains: list[str] = field(default_factory=list)
    # Rows of the item-ID residual table (0 = no residual). Row r >= 1 belongs to residual_ids[r-1].
    residual_rows: int = 0
    # "linear" (PCA-initialised projection) or "mlp" (the projection plus a zero-initialised
    # two-layer correction, so training starts from the linear map).
    adapter: str = "linear"
    # "dot" or "cosine" (both sides unit-normalised, logits divided by temperature).
    score: str = "dot"
    temperature: float = 0.07
    init_std: float = 0.02

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HierConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


class Block(nn.Module):
    """Post-LN transformer block (SASRec / RecBole form): x = LN(x + drop(attn(x))), then the FFN.

    Causal attention through ``scaled_dot_product_attention``; with left-aligned sequences a real
    position never attends to right padding, so no key-padding mask is needed.
    """

    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float, attn_dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.drop1 = nn.Dropout(dropout)
        self.ln1 = nn.LayerNorm(hidden, eps=1e-12)
        self.ff1 = nn.Linear(hidden, ffn)
        self.ff2 = nn.Linear(ffn, hidden)
        self.drop2 = nn.Dropout(dropout)
        self.ln2 = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.attn_dropout if self.training else 0.0
        )
        a = self.out(a.transpose(1, 2).reshape(b, t, d))
        x = self.ln1(x + self.drop1(a))
        return self.ln2(x + self.drop2(self.ff2(F.gelu(self.ff1(x)))))


class ItemAdapter(nn.Module):
    """Text vector [.., text_dim] -> item vector [.., dim]."""

    def __init__(self, cfg: HierConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.text_dim, cfg.dim)
        self.mlp: nn.Sequential | None = None
        if cfg.adapter == "mlp":
            self.mlp = nn.Sequential(
                nn.Linear(cfg.text_dim, cfg.ffn), nn.GELU(), nn.Linear(cfg.ffn, cfg.dim)
            )
        elif cfg.adapter != "linear":
            raise ValueError(f"adapter must be linear or mlp, not {cfg.adapter!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return y + self.mlp(x) if self.mlp is not None else y


class HierRec(nn.Module):
    """Item adapter + residual table + causal user encoder; see the module docstring."""

    def __init__(self, cfg: HierConfig, residual_ids: list[str] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        ids = list(residual_ids or [])
        if cfg.residual_rows and len(ids) != cfg.residual_rows - 1:
            raise ValueError(f"{len(ids)} residual ids for {cfg.residual_rows - 1} residual rows")
        self.residual_ids = ids
        self.residual_row = {s: r + 1 for r, s in enumerate(ids)}
        self.domain_index = {d: i + 1 for i, d in enumerate(cfg.domains)}  # 0 = unknown domain
        self.adapter = ItemAdapter(cfg)
        # Row 0 (an item never seen in training) is the padding row: always zero, never trained.
        self.residual = (
            nn.Embedding(cfg.residual_rows, cfg.dim, padding_idx=0) if cfg.residual_rows else None
        )
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        self.dom_emb = nn.Embedding(len(cfg.domains) + 1, cfg.dim)
        self.ln = nn.LayerNorm(cfg.dim, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.ffn, cfg.dropout, cfg.attn_dropout)
            for _ in range(cfg.layers)
        )
        self.reset_parameters()

    # -- initialisation ---------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """N(0, init_std) for every matrix and embedding (PyTorch's N(0, 1) for embeddings would
        swamp the item vectors), zero residual and zero MLP output so that training starts from
        the text projection alone."""
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.residual is not None:
            nn.init.zeros_(self.residual.weight)
        if self.adapter.mlp is not None:
            last = self.adapter.mlp[-1]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    @torch.no_grad()
    def init_adapter_pca(self, text_vecs: torch.Tensor) -> None:
        """Set the projection to the top ``dim`` principal directions of ``text_vecs`` (centred),
        so the initial item table keeps as much of the text geometry as ``dim`` dimensions can."""
        x = text_vecs.float()
        mean = x.mean(0)
        q = min(self.cfg.dim, x.shape[0], x.shape[1])
        _, _, v = torch.pca_lowrank(x - mean, q=q, center=False, niter=4)
        w = torch.zeros(self.cfg.dim, x.shape[1])
        w[:q] = v[:, :q].T
        self.adapter.proj.weight.copy_(w)
        self.adapter.proj.bias.copy_(-(w @ mean))

    # -- items ------------------------------------------------------------------------------

    def residual_rows_for(self, item_ids: list[str]) -> torch.Tensor:
        """Residual row of each item id (0 = none: an item never seen in training)."""
        return torch.tensor([self.residual_row.get(i, 0) for i in item_ids], dtype=torch.long)

    def item_vectors(
        self, text_vecs: torch.Tensor, rows: torch.Tensor | None = None, use_residual: bool = True
    ) -> torch.Tensor:
        """[N, text_dim] text vectors (+ [N] residual rows) -> [N, dim] item vectors, the ones
        the index holds and the ones training scores against (unit vectors for ``cosine``)."""
        v = self.adapter(text_vecs)
        if use_residual and self.residual is not None and rows is not None:
            v = v + self.residual(rows)
        return F.normalize(v, dim=-1) if self.cfg.score == "cosine" else v

    # -- users ------------------------------------------------------------------------------

    def states(self, item_vecs: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        """[B, T, dim] item vectors (left-aligned, right-padded) and [B, T] domain indices ->
        [B, T, dim] states; position t has seen items 0..t only."""
        t = item_vecs.shape[1]
        if t > self.cfg.max_len:
            raise ValueError(f"sequence of {t} > max_len {self.cfg.max_len}; keep the last items")
        pos = torch.arange(t, device=item_vecs.device)
        x = item_vecs + self.pos_emb(pos)[None] + self.dom_emb(domains)
        x = self.drop(self.ln(x))
        for blk in self.blocks:
            x = blk(x)
        return x

    def user_vectors(
        self, item_vecs: torch.Tensor, domains: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """The state at each sequence's last real position [B, dim] (unit for ``cosine``)."""
        s = self.states(item_vecs, domains)
        u = s[torch.arange(s.shape[0], device=s.device), lengths - 1]
        return self.output(u)

    def encode_histories(
        self,
        text_vecs: torch.Tensor,
        rows: torch.Tensor,
        domains: torch.Tensor,
        lengths: torch.Tensor,
        use_residual: bool = True,
    ) -> torch.Tensor:
        """The one path from a batch of histories to user vectors, used by the offline evaluator
        and the service alike: [B, T, text_dim] LM vectors of the history items (oldest first,
        right-padded), [B, T] residual rows (0 = none or padding), [B, T] domain indices
        (``domain_ids``; 0 for padding), [B] lengths (each >= 1, <= max_len) -> [B, dim]."""
        b, t, _ = text_vecs.shape
        valid = torch.arange(t, device=text_vecs.device)[None] < lengths[:, None]  # [B, T]
        x = self.item_vectors(text_vecs.reshape(b * t, -1), rows.reshape(-1), use_residual)
        x = x.reshape(b, t, -1) * valid.unsqueeze(-1).to(x.dtype)
        return self.user_vectors(x, domains.masked_fill(~valid, 0), lengths)

    def output(self, states: torch.Tensor) -> torch.Tensor:
        return F.normalize(states, dim=-1) if self.cfg.score == "cosine" else states

    def logit_scale(self) -> float:
        return 1.0 / self.cfg.temperature if self.cfg.score == "cosine" else 1.0

    def domain_ids(self, domains: list[str]) -> torch.Tensor:
        return torch.tensor([self.domain_index.get(d, 0) for d in domains], dtype=torch.long)

    # -- one folder -------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        (path / RESIDUAL_IDS_FILE).write_text(json.dumps(self.residual_ids) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> HierRec:
        from safetensors.torch import load_file

        path = Path(path)
        cfg = HierConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
        ids = json.loads((path / RESIDUAL_IDS_FILE).read_text())
        model = cls(cfg, ids)
        model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        return model.to(device).eval()


def is_hier_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def recency_weights(n: int, half_life: float = 3.0) -> np.ndarray:
    """Weights of a history's n items, oldest first: the latest counts 1, one ``half_life``
    items back counts 1/2 (the zero-shot user vector's mean). [n] float64."""
    age = np.arange(n - 1, -1, -1, dtype=np.float64)
    return np.exp(-age * math.log(2.0) / max(half_life, 1e-6))


# -- zero-shot (no trained artifact) ----------------------------------------------------------

# The served default without a trained model: a recency-weighted mean of the history's LM item
# vectors (target-domain items first) plus a popularity prior; chosen on FK-LOO valid by
# bench/zeroshot_sweep.py, see docs/decisions/001-zero-shot-default.md. Plain numpy: the service
# computes it on the event loop (a torch op would wait behind the device thread's forwards) and
# the offline evaluator calls the same functions.
ZS_HALF_LIFE = 1.0
ZS_POP_WEIGHT = 0.05


def zero_shot_query(lm: np.ndarray, domains: Sequence[str], target: str | None) -> np.ndarray:
    """[T, D] unit LM vectors of a history (oldest first) and their domains -> [D + 1] query:
    the recency-weighted mean of the target domain's items (all items when it has none),
    unit-normalised, then a trailing 1 that multiplies the items' popularity column."""
    pick = [i for i, d in enumerate(domains) if d == target] if target else []
    idx = pick or list(range(len(domains)))
    v = np.asarray(lm)[idx].astype(np.float64)  # [n, D]
    u = (recency_weights(len(idx), ZS_HALF_LIFE)[:, None] * v).sum(0)
    u /= max(float(np.linalg.norm(u)), 1e-12)
    return np.concatenate([u, [1.0]]).astype(np.float32)


def zero_shot_items(lm: np.ndarray, popularity: Sequence[float] | np.ndarray) -> np.ndarray:
    """[N, D] unit LM item vectors and [N] interaction counts -> [N, D + 1] float32 index rows,
    so an inner product with ``zero_shot_query`` is cosine + ZS_POP_WEIGHT * log(1 + count)."""
    pop = np.maximum(np.asarray(popularity, dtype=np.float32).reshape(-1), 0.0)
    prior = (ZS_POP_WEIGHT * np.log1p(pop)).astype(np.float32)
    return np.concatenate([np.asarray(lm, dtype=np.float32), prior[:, None]], axis=1)
