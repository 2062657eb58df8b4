import json
from pathlib import Path

import pytest
from train_util import build_tiny_llama, tiny_config, toy_data

from training.corpus import build_corpus, hf_token_counter
from training.cpt import run_cpt


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-cpt"))


def _corpus(cfg, base):
    from transformers import AutoTokenizer

    return build_corpus(
        toy_data(), cfg.template, cfg.corpus, hf_token_counter(AutoTokenizer.from_pretrained(base))
    )[0]


@pytest.mark.parametrize("lora", [False, True])
def test_loss_decreases(tmp_path, llama, lora):
    cfg = tiny_config(
        tmp_path,
        llama,
        "cpt.steps=30",
        "cpt.lr=1.0e-2",
        f"cpt.lora.enabled={str(lora).lower()}",
        "cpt.lora.r=8",
        "cpt.log_every=5",
        "cpt.checkpoint_every=100",
    )
    chunks = _corpus(cfg, llama)
    res = run_cpt(cfg, llama, chunks, tmp_path / "cpt")
    s = res.summary
    # full tuning of a random model drops fast; LoRA (8k parameters) slower but clearly
    assert s["final_loss"] < s["first_loss"] * (0.97 if lora else 0.8), s
    assert (res.model_dir / "config.json").is_file()
    assert (tmp_path / "cpt" / "curves.png").stat().st_size > 0
    rows = (tmp_path / "cpt" / "log.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,tokens,tokens_per_s" and len(rows) == 7
    assert s["tokens_per_s"] > 0
    if lora:  # merged: a plain model without adapter files
        assert not (res.model_dir / "adapter_config.json").exists()
        assert s["trainable_params"] < s["total_params"] / 2


def test_resume_replays_the_same_run(tmp_path, llama, monkeypatch):
    from training.loop import Checkpoint

    cfg = tiny_config(
        tmp_path, llama, "cpt.steps=6", "cpt.checkpoint_every=3", "cpt.anneal_domains=[Food]"
    )
    chunks = _corpus(cfg, llama)
    straight = run_cpt(cfg, llama, chunks, tmp_path / "a")
    assert straight.summary["resumed_from"] == 0
    # a finished run with the same config is reused, not retrained
    again = run_cpt(cfg, llama, chunks, tmp_path / "a").summary
    assert again.pop("reused") is True and again == straight.summary
    assert "reused" not in straight.summary

    real_save = Checkpoint.save

    def save_then_crash(self, *args, **kw):
        real_save(self, *args, **kw)
        raise KeyboardInterrupt  # killed right after the step-3 checkpoint

    monkeypatch.setattr(Checkpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_cpt(cfg, llama, chunks, tmp_path / "b")
    monkeypatch.setattr(Checkpoint, "save", real_save)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 3
    resumed = run_cpt(cfg, llama, chunks, tmp_path / "b")
    assert resumed.summary["resumed_from"] == 3
    a = (tmp_path / "a" / "log.csv").read_text().splitlines()
    b = (tmp_path / "b" / "log.csv").read_text().splitlines()
    loss = lambda rows: [float(r.split(",")[1]) for r in rows[1:]]  # noqa: E731
    assert loss(a) == pytest.approx(loss(b), rel=1e-4)  # same batches, same updates


def test_mlm_masking_rule():
    import torch
    from transformers import AutoTokenizer

    from cprec.lm import bundled_dir
    from training.cpt import _collate, mask_tokens

    tok = AutoTokenizer.from_pretrained(bundled_dir("minilm-l6", Path("var/store")))
    seqs = [tok("Food: coffee beans; Kitchen: burr grinder " * 8)["input_ids"], [101, 2000, 102]]
    batch = _collate(seqs, tok.pad_token_id)
    a = mask_tokens(batch, tok, torch.Generator().manual_seed(1))
    b = mask_tokens(batch, tok, torch.Generator().manual_seed(1))
    assert torch.equal(a["input_ids"], b["input_ids"])  # seeded: resumable runs replay masks
    target = a["labels"] != -100
    special = torch.isin(batch["input_ids"], torch.tensor(tok.all_special_ids))
    assert not (target & special).any() and not (target & (batch["attention_mask"] == 0)).any()
    assert torch.equal(a["labels"][target], batch["input_ids"][target])  # labels = originals
    eligible = int(((batch["attention_mask"] == 1) & ~special).sum())
    assert 0.05 * eligible < int(target.sum()) < 0.3 * eligible
    # unchanged outside the targets; most targets become [MASK]
    assert torch.equal(a["input_ids"][~target], batch["input_ids"][~target])
    assert (a["input_ids"][target] == tok.mask_token_id).float().mean() > 0.5


def test_mlm_cpt_on_an_encoder(tmp_path):
    """Encoder-only bases get masked-language modelling; the result loads as a plain encoder."""
    from train_util import build_tiny_bert
    from transformers import AutoModel

    bert = build_tiny_bert(tmp_path / "bert")
    cfg = tiny_config(
        tmp_path, bert, "cpt.steps=30", "cpt.lr=5.0e-3", "cpt.lora.enabled=false", "cpt.log_every=5"
    )
    res = run_cpt(cfg, bert, _corpus(cfg, bert), tmp_path / "cpt")
    s = res.summary
    assert s["objective"] == "mlm"
    assert s["final_loss"] < s["first_loss"] * 0.8, s
    enc = AutoModel.from_pretrained(res.model_dir)
    assert type(enc).__name__ == "BertModel"
    base = AutoModel.from_pretrained(bert)
    changed = [
        n
        for n, p in enc.named_parameters()
        if n in dict(base.named_parameters()) and not p.equal(dict(base.named_parameters())[n])
    ]
    assert any(n.startswith("encoder.") for n in changed)  # the encoder itself was trained


def test_mlm_cpt_with_lora(tmp_path):
    from train_util import build_tiny_bert

    bert = build_tiny_bert(tmp_path / "bert")
    cfg = tiny_config(tmp_path, bert, "cpt.steps=4", "cpt.lora.enabled=true", "cpt.log_every=2")
    res = run_cpt(cfg, bert, _corpus(cfg, bert), tmp_path / "cpt")
    assert res.summary["objective"] == "mlm"
    assert res.summary["trainable_params"] < res.summary["total_params"] / 2
    assert not (res.model_dir / "adapter_config.json").exists()  # merged
