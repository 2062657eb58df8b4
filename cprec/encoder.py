"""Text -> unit vectors, split in three steps (infinity's pre/core/post):

``pre`` tokenises on CPU (any thread), ``core`` pads and runs the forward pass on the device, and
pooling + L2 normalisation finish inside ``core`` so only [B, D] float32 leaves the device.
"""

from __future__ import annotations

import hashlib
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cprec.lm import (
    LMSource,
    Pooling,
    TextKind,
    TextTokenizer,
    fit_max_length,
    load_backbone,
    load_tokenizer,
    pool,
    resolve_base_model,
    resolve_device,
    resolve_dtype,
)

log = logging.getLogger(__name__)


class Encoder(ABC):
    """The encoding boundary the batcher, the index builder and the engine talk to."""

    dim: int
    name: str

    @abstractmethod
    def pre(self, texts: Sequence[str], kind: TextKind) -> list[list[int]]:
        """Tokenise (CPU, thread-safe)."""

    @abstractmethod
    def core(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Pad, forward and pool one batch -> [B, D] float32 unit vectors."""

    def encode(self, texts: Sequence[str], kind: TextKind, batch_size: int = 64) -> np.ndarray:
        """Convenience for offline use: length-sorted batches, results in input order."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids = self.pre(texts, kind)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            out[chunk] = self.core([ids[i] for i in chunk])
        return out

    def warmup(self) -> None:
        """One forward pass so the first request does not pay for lazy initialisation."""
        self.encode(["warm up: the first forward allocates kernels"], "query")


class HFEncoder(Encoder):
    """A transformers backbone with architecture-appropriate pooling."""

    def __init__(
        self,
        model_dir: Path,
        pooling: Pooling,
        is_decoder: bool,
        max_length: int = 256,
        device: str = "auto",
        dtype: str = "auto",
        name: str | None = None,
        quantize: str = "none",
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if quantize not in ("none", "int8"):
            raise ValueError(f"unknown quantize {quantize!r}; use none or int8")
        if quantize == "int8":
            if self.device.type != "cpu":
                raise ValueError("quantize=int8 is a CPU option; use dtype=bfloat16 on CUDA")
            self.dtype = torch.float32  # dynamic int8 quantises fp32 Linear layers
        self.quantize = quantize
        self.pooling: Pooling = pooling
        self.is_decoder = is_decoder
        self.name = name or str(model_dir)
        tok = load_tokenizer(model_dir)
        self.model = load_backbone(model_dir, dtype=self.dtype).to(self.device)
        max_length = fit_max_length(max_length, self.model.config)
        self.tokenizer = TextTokenizer(tok, max_length=max_length, is_decoder=is_decoder)
        if quantize == "int8":
            # Dynamic int8 with per-channel weight scales on every Linear. Activations are
            # quantised with one scale per batch at run time, so a text's vector depends on the
            # other texts in its batch; off by default for that reason. bench/encoder.py
            # measures that, its FK-LOO NDCG@10 loss and its speed (docs/benchmarks.md).
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            self.model = quantize_dynamic(
                self.model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8
            )
        self.dim = int(self.model.config.hidden_size)
        log.info(
            "encoder %s on %s (%s%s), pooling=%s, dim=%d",
            self.name,
            self.device,
            str(self.dtype).removeprefix("torch."),
            ", int8 dynamic" if quantize == "int8" else "",
            pooling,
            self.dim,
        )

    @classmethod
    def from_source(cls, source: LMSource, **kwargs: object) -> HFEncoder:
        """An encoder over a resolved base LM (``cprec.lm.resolve_base_model``), named after it
        unless ``name`` is given; other keyword arguments as for the constructor."""
        kwargs.setdefault("name", source.version)
        return cls(source.path, source.pooling, source.is_decoder, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_base(cls, base: str, cache_dir: Path, **kwargs: object) -> HFEncoder:
        """A bundled base (``minilm-l6``, ``smollm2-135m``) or a local HF folder."""
        return cls.from_source(resolve_base_model(base, cache_dir), **kwargs)

    def pre(self, texts: Sequence[str], kind: TextKind) -> list[list[int]]:
        return self.tokenizer(texts, kind)  # thread-safe (see TextTokenizer)

    def core(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        ids, mask = self.tokenizer.collate(batch)  # [B, T] each
        with torch.inference_mode():
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
            vec = pool(hidden, mask, self.pooling)  # [B, H], unit norm, float32
        return vec.cpu().numpy().astype(np.float32, copy=False)


_WORD = re.compile(r"[a-z0-9]+")


class FakeEncoder(Encoder):
    """Deterministic bag-of-words hashing encoder: no weights, exact and fast for tests.

    Texts that share words get similar vectors, so ranking tests can assert real behaviour.
    """

    def __init__(self, dim: int = 64, name: str = "fake") -> None:
        self.dim = dim
        self.name = name
        self.calls = 0  # forward passes, for batching tests
        self.batch_sizes: list[int] = []

    def pre(self, texts: Sequence[str], kind: TextKind) -> list[list[int]]:
        out = []
        for t in texts:
            words = _WORD.findall(t.lower()) or ["<empty>"]
            out.append([int(hashlib.md5(w.encode()).hexdigest()[:8], 16) for w in words])
        return out

    def core(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        self.calls += 1
        self.batch_sizes.append(len(batch))
        out = np.zeros((len(batch), self.dim), dtype=np.float32)
        for i, ids in enumerate(batch):
            for h in ids:
                rng = np.random.default_rng(h)
                out[i] += rng.standard_normal(self.dim).astype(np.float32)
            out[i] /= max(float(np.linalg.norm(out[i])), 1e-12)
        return out
