import numpy as np
import pytest
from train_util import build_tiny_bert, build_tiny_llama, tiny_config, toy_data

from training.finetune import Example, build_candidates, make_examples, run_finetune


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-ft")
    return {"llama": build_tiny_llama(root / "llama"), "bert": build_tiny_bert(root / "bert")}


def test_candidates_in_batch_and_same_domain():
    data = toy_data()
    pools = {d: data.data.domain_items(d) for d in data.data.domains}
    items = data.data.items
    batch = [Example([1], 3, "Food"), Example([2], 70, "Kitchen"), Example([4], 3, "Food")]
    cand, labels = build_candidates(batch, pools, 4, np.random.default_rng(0))
    assert cand[:2] == [3, 70]  # distinct batch targets first: in-batch negatives
    assert labels == [0, 1, 0]
    negs = cand[2:]
    assert len(negs) == len(set(negs)) and 3 not in negs and 70 not in negs
    # 4 per example, each from its target's domain: 2 Food rows + 1 Kitchen row
    n_food = sum(items[j].domain == "Food" for j in negs)
    assert n_food >= 4 and len(negs) - n_food >= 4 and len(negs) <= 12


def test_examples_use_train_only():
    data = toy_data()
    ex = make_examples(data, 3, seed=0)
    targets = {(c.user_id, c.target) for c in data.data.valid + data.data.test}
    train_items = {i for s in data.data.train for i in s.item_ids}
    assert all(e.target in train_items for e in ex)
    assert len(ex) >= len(data.data.train)
    assert targets  # sanity


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_loss_decreases(tmp_path, models, arch):
    cfg = tiny_config(
        tmp_path,
        models[arch],
        "finetune.steps=24",
        "finetune.lr=5.0e-3",
        "finetune.lora.enabled=false",
        "finetune.eval_every=12",
        "finetune.log_every=4",
        "finetune.batch_size=12",
        "cpt.enabled=false",
    )
    res = run_finetune(cfg, models[arch], toy_data(), tmp_path / "ft")
    s = res.summary
    assert s["final_loss"] < s["first_loss"], s
    assert s["pooling"] == ("last" if arch == "llama" else "mean")
    assert s["best_valid_ndcg10"] is not None and (res.model_dir / "config.json").is_file()


def test_lora_and_item_residual(tmp_path, models):
    cfg = tiny_config(
        tmp_path,
        models["llama"],
        "finetune.steps=6",
        "finetune.item_id_residual=true",
        "finetune.eval_every=3",
    )
    res = run_finetune(cfg, models["llama"], toy_data(), tmp_path / "ft")
    assert res.summary["item_id_residual"] is True
    assert (tmp_path / "ft" / "item_residual.safetensors").is_file()
    assert not (res.model_dir / "adapter_config.json").exists()  # LoRA merged


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_freeze_layers_keeps_the_bottom_fixed(tmp_path, models, arch):
    from transformers import AutoModel

    cfg = tiny_config(
        tmp_path,
        models[arch],
        "finetune.steps=4",
        "finetune.lr=5.0e-3",
        "finetune.lora.enabled=false",
        "finetune.freeze_layers=1",
        "finetune.early_stopping=false",
        "cpt.enabled=false",
    )
    res = run_finetune(cfg, models[arch], toy_data(), tmp_path / "ft")
    before = dict(AutoModel.from_pretrained(models[arch]).named_parameters())
    after = dict(AutoModel.from_pretrained(res.model_dir).named_parameters())
    layer = "encoder.layer." if arch == "bert" else "layers."
    same = {n for n in before if n in after and after[n].equal(before[n])}
    assert all(n in same for n in before if n.startswith(layer + "0.") or "embed" in n)
    assert any(n not in same for n in before if n.startswith(layer + "1."))  # top layer trained
    assert res.summary["trainable_params"] < res.summary["total_params"]


def test_freeze_layers_must_match(models):
    import torch
    from transformers import AutoModel

    from training.finetune import freeze_bottom

    m = AutoModel.from_pretrained(models["bert"])
    assert freeze_bottom(m, 1) > 0
    with pytest.raises(ValueError, match="no embedding or layer"):
        freeze_bottom(torch.nn.Linear(2, 2), 1)
