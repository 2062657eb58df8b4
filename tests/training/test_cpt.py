import json

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
    import training.cpt as cpt_mod

    cfg = tiny_config(
        tmp_path, llama, "cpt.steps=6", "cpt.checkpoint_every=3", "cpt.anneal_domains=[Food]"
    )
    chunks = _corpus(cfg, llama)
    straight = run_cpt(cfg, llama, chunks, tmp_path / "a")
    assert straight.summary["resumed_from"] == 0
    # a finished run with the same config is reused, not retrained
    assert run_cpt(cfg, llama, chunks, tmp_path / "a").summary == straight.summary

    real_save = cpt_mod._save_checkpoint

    def save_then_crash(*args, **kw):
        real_save(*args, **kw)
        raise KeyboardInterrupt  # killed right after the step-3 checkpoint

    monkeypatch.setattr(cpt_mod, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_cpt(cfg, llama, chunks, tmp_path / "b")
    monkeypatch.setattr(cpt_mod, "_save_checkpoint", real_save)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 3
    resumed = run_cpt(cfg, llama, chunks, tmp_path / "b")
    assert resumed.summary["resumed_from"] == 3
    a = (tmp_path / "a" / "log.csv").read_text().splitlines()
    b = (tmp_path / "b" / "log.csv").read_text().splitlines()
    loss = lambda rows: [float(r.split(",")[1]) for r in rows[1:]]  # noqa: E731
    assert loss(a) == pytest.approx(loss(b), rel=1e-4)  # same batches, same updates


def test_encoder_refused(tmp_path):
    from train_util import build_tiny_bert

    bert = build_tiny_bert(tmp_path / "bert")
    cfg = tiny_config(tmp_path, bert)
    with pytest.raises(ValueError, match="not a decoder"):
        run_cpt(cfg, bert, _corpus(cfg, bert), tmp_path / "cpt")
