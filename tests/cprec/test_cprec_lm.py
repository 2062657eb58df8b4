"""cprec.lm: truncation sides, special tokens, padding and pooling on hand-built tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cprec.lm import (
    BUNDLED,
    TextTokenizer,
    bundled_dir,
    detect_pooling,
    fit_max_length,
    load_tokenizer,
    pool,
    resolve_device,
    resolve_dtype,
)


@pytest.fixture(scope="module")
def bert_tok(minilm_dir: Path):  # type: ignore[no-untyped-def]
    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="module")
def llama_tok(tiny_llama_dir: Path):  # type: ignore[no-untyped-def]
    return load_tokenizer(tiny_llama_dir)


def test_encoder_special_tokens_found(bert_tok) -> None:  # type: ignore[no-untyped-def]
    tt = TextTokenizer(bert_tok, max_length=16, is_decoder=False)
    assert tt.prefix == [bert_tok.cls_token_id]
    assert tt.suffix == [bert_tok.sep_token_id]
    assert tt.n_special == 2
    ids = tt(["coffee"], "item")[0]
    assert ids == bert_tok("coffee")["input_ids"]  # same as the tokenizer's own special tokens


def test_encoder_query_keeps_most_recent_tokens(bert_tok) -> None:  # type: ignore[no-untyped-def]
    words = [f"w{i}" for i in range(40)]
    text = " ".join(words)
    raw = bert_tok(text, add_special_tokens=False)["input_ids"]
    tt = TextTokenizer(bert_tok, max_length=12, is_decoder=False)
    q = tt([text], "query")[0]
    it = tt([text], "item")[0]
    assert len(q) == len(it) == 12
    assert q == [bert_tok.cls_token_id] + raw[-10:] + [bert_tok.sep_token_id]
    assert it == [bert_tok.cls_token_id] + raw[:10] + [bert_tok.sep_token_id]
    assert q != it


def test_short_text_is_not_truncated(bert_tok) -> None:  # type: ignore[no-untyped-def]
    tt = TextTokenizer(bert_tok, max_length=64, is_decoder=False)
    raw = bert_tok("dark roast coffee", add_special_tokens=False)["input_ids"]
    assert tt(["dark roast coffee"], "query")[0][1:-1] == raw


def test_decoder_appends_eos_after_truncation(llama_tok) -> None:  # type: ignore[no-untyped-def]
    tt = TextTokenizer(llama_tok, max_length=5, is_decoder=True)
    assert tt.prefix == [] and tt.suffix == []
    text = "coffee tea honey space saga garden"
    raw = llama_tok(text, add_special_tokens=False)["input_ids"]
    assert len(raw) == 6
    q = tt([text], "query")[0]
    it = tt([text], "item")[0]
    eos = llama_tok.eos_token_id
    assert q == raw[-4:] + [eos]
    assert it == raw[:4] + [eos]
    short = tt(["coffee"], "item")[0]
    assert short[-1] == eos and len(short) == 2


def test_collate_right_pads_with_mask(llama_tok) -> None:  # type: ignore[no-untyped-def]
    tt = TextTokenizer(llama_tok, max_length=32, is_decoder=True)
    ids, mask = tt.collate([[5, 6, 7], [8]])
    # width bucketed up to a multiple of PAD_MULTIPLE (8): fewer shapes for oneDNN / tensor cores
    p = tt.pad_id
    assert ids.tolist() == [[5, 6, 7] + [p] * 5, [8] + [p] * 7]
    assert mask.tolist() == [[1, 1, 1] + [0] * 5, [1] + [0] * 7]
    wide, _ = tt.collate([[1] * 9])
    assert wide.shape == (1, 16)
    assert ids.dtype == mask.dtype == torch.long


def _hidden() -> tuple[torch.Tensor, torch.Tensor]:
    # [B=2, T=3, H=2]; row 1 has one real token followed by padding that must be ignored.
    hidden = torch.tensor(
        [[[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]], [[0.0, 2.0], [100.0, 0.0], [100.0, 100.0]]]
    )
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    return hidden, mask


def test_pool_mean_ignores_padding() -> None:
    hidden, mask = _hidden()
    out = pool(hidden, mask, "mean")
    exp0 = torch.tensor([4.0, 5.0]) / 3
    torch.testing.assert_close(out[0], exp0 / exp0.norm())
    torch.testing.assert_close(out[1], torch.tensor([0.0, 1.0]))


def test_pool_cls_takes_first_token() -> None:
    hidden, mask = _hidden()
    out = pool(hidden, mask, "cls")
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_pool_last_takes_last_real_token() -> None:
    hidden, mask = _hidden()
    out = pool(hidden, mask, "last")
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))


def test_pool_output_is_unit_float32_from_bf16() -> None:
    hidden = torch.randn(4, 5, 8).to(torch.bfloat16)
    mask = torch.ones(4, 5, dtype=torch.long)
    out = pool(hidden, mask, "mean")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))


def test_pool_unknown_is_refused() -> None:
    hidden, mask = _hidden()
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(hidden, mask, "max")  # type: ignore[arg-type]


def test_detect_pooling_by_architecture(tiny_bert_dir: Path, tiny_llama_dir: Path) -> None:
    assert detect_pooling(tiny_bert_dir) == "mean"
    assert detect_pooling(tiny_llama_dir) == "last"


def test_bundled_registry_and_unknown_name(tmp_path: Path, minilm_dir: Path) -> None:
    assert BUNDLED["minilm-l6"].pooling == "mean" and not BUNDLED["minilm-l6"].is_decoder
    assert BUNDLED["smollm2-135m"].pooling == "last" and BUNDLED["smollm2-135m"].is_decoder
    assert (minilm_dir / "config.json").is_file()
    with pytest.raises(KeyError, match="unknown bundled model"):
        bundled_dir("no-such-model", tmp_path)


def test_resolve_device_and_dtype() -> None:
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="cuda"):
            resolve_device("cuda")
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3", cpu)


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_fast_path_matches_the_wrapper_and_is_thread_safe(which, bert_tok, llama_tok) -> None:  # type: ignore[no-untyped-def]
    """The private Rust backend gives the wrapper's ids, also when called from many threads."""
    from concurrent.futures import ThreadPoolExecutor

    tok = bert_tok if which == "bert" else llama_tok
    tt = TextTokenizer(tok, max_length=24, is_decoder=which == "llama")
    assert tt._fast is not None
    texts = [
        f"Grocery: Dark roast coffee {i} ; Kitchen: Pour-over kettle, 1.2 L {'x ' * (i % 30)}"
        for i in range(200)
    ]
    slow = TextTokenizer(tok, max_length=24, is_decoder=which == "llama")
    slow._fast = None  # the transformers wrapper, behind its lock
    for kind in ("query", "item"):
        want = slow(texts, kind)
        assert tt(texts, kind) == want
        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda t, k=kind: tt([t], k)[0], texts))
        assert got == want
    # the wrapper's own truncation settings never reach the private copy
    tok(texts[0], truncation=True, max_length=4)
    assert tt(texts[:1], "item") == slow(texts[:1], "item")


def test_fit_max_length_follows_the_position_embeddings() -> None:
    from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig

    assert fit_max_length(256, BertConfig(max_position_embeddings=128)) == 128
    assert fit_max_length(64, BertConfig(max_position_embeddings=128)) == 64
    # RoBERTa's position ids start after its padding index (1): 514 embeddings hold 512 tokens
    assert fit_max_length(1024, RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert fit_max_length(4096, LlamaConfig(max_position_embeddings=2048)) == 2048
    assert fit_max_length(4096, GPT2Config(n_positions=1024)) == 1024
    assert fit_max_length(300, object()) == 300  # nothing known: unchanged


def test_collate_never_pads_past_max_length(bert_tok) -> None:  # type: ignore[no-untyped-def]
    """Rounding the width up to PAD_MULTIPLE must stop at max_length (the model's last
    position when fit_max_length cut it)."""
    tt = TextTokenizer(bert_tok, max_length=13, is_decoder=False)
    ids = tt(["coffee " * 40, "tea"], "query")
    assert max(len(x) for x in ids) == 13
    batch, mask = tt.collate(ids)
    assert batch.shape == (2, 13) and mask.shape == (2, 13)
    assert tt.collate(tt(["tea"], "query"))[0].shape[1] == 8  # short texts still round up
