"""cprec.recommender: one folder round-trips a recommender, hier and flat, and is refused with
the offending file named when it does not make one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from testutil import tiny_hier

from cprec.encoder import FakeEncoder
from cprec.hier import HierRec
from cprec.recommender import (
    ArtifactFormatError,
    HistoryVectors,
    Recommender,
    RecommenderConfig,
    save_pretrained,
)
from cprec.text import Template


def _hier() -> HierRec:
    return tiny_hier(dim=8, domains=("A", "B"), residual_ids=("x", "y"))  # type: ignore[no-any-return]


def _config(kind: str, dim: int) -> RecommenderConfig:
    return RecommenderConfig(
        kind=kind, base_model="tiny", pooling="mean", dim=dim, max_length=32,
        template=Template(max_items=7).model_dump(),
    )  # fmt: skip


def test_hier_round_trip(tmp_path: Path, tiny_bert_dir: Path) -> None:
    hier = _hier()
    folder = save_pretrained(tmp_path / "rec", tiny_bert_dir, _config("hier", 8), hier)
    assert (folder / "recommender.json").is_file() and (folder / "config.json").is_file()
    rec = Recommender.from_pretrained(folder, device="cpu", dtype="float32")
    assert rec.scorer == "hier" and rec.user_dim == 8 and rec.history_len == 4
    assert rec.template.max_items == 7 and rec.version == "rec"
    assert rec.files(folder) == [
        "recommender.json", "hier/hier_config.json", "hier/hier.safetensors",
        "hier/residual_ids.json",
    ]  # fmt: skip
    lm = rec.encoder.encode(["A: one", "B: two"], "item")
    rows = rec.item_rows(lm, ["x", "new"], [0.0, 0.0])
    with torch.no_grad():
        want = hier.item_vectors(torch.from_numpy(lm), hier.residual_rows_for(["x", "new"]))
    np.testing.assert_allclose(rows, want.numpy(), atol=1e-6)
    user = rec.users([HistoryVectors(lm, ["x", None], ["A", "B"])])
    assert user.shape == (1, 8)
    again = Recommender.from_pretrained(rec.save_pretrained(tmp_path / "copy"), device="cpu")
    assert again.scorer == "hier" and again.hier is not None
    np.testing.assert_array_equal(
        again.hier.adapter.proj.weight.detach().numpy(), hier.adapter.proj.weight.detach().numpy()
    )


def test_flat_folder_and_older_store_versions(tmp_path: Path, tiny_bert_dir: Path) -> None:
    folder = save_pretrained(tmp_path / "flat", tiny_bert_dir, _config("flat", 32))
    rec = Recommender.from_pretrained(folder, device="cpu")
    assert rec.scorer == "text" and rec.user_dim == 32 and not rec.keeps_lm_vectors
    # A version published before recommender.json existed: its manifest's fields are read.
    old = tmp_path / "old"
    shutil.copytree(tiny_bert_dir, old)
    fields = {**_config("flat", 32).model_dump(), "version": "v7", "files": {}}
    (old / "manifest.json").write_text(json.dumps(fields))
    assert Recommender.from_pretrained(old, device="cpu").version == "v7"


def test_refusals_name_the_file(tmp_path: Path, tiny_bert_dir: Path) -> None:
    folder = save_pretrained(tmp_path / "h", tiny_bert_dir, _config("hier", 8), _hier())
    shutil.rmtree(folder / "hier")
    with pytest.raises(ArtifactFormatError) as err:
        Recommender.from_pretrained(folder, device="cpu")
    assert err.value.file == "hier/hier_config.json"
    wrong = save_pretrained(tmp_path / "w", tiny_bert_dir, _config("hier", 16), _hier())
    with pytest.raises(ArtifactFormatError, match="dim 16 but the HierRec has dim 8"):
        Recommender.from_pretrained(wrong, device="cpu")
    with pytest.raises(ArtifactFormatError, match="text_dim"):
        Recommender(FakeEncoder(dim=5), "v", hier=_hier())
    with pytest.raises(ArtifactFormatError, match="recommender.json"):
        Recommender.from_pretrained(tmp_path, device="cpu")  # no config at all
    with pytest.raises(ValueError, match="HierRec"):
        save_pretrained(tmp_path / "x", tiny_bert_dir, _config("hier", 8))


def test_zero_shot_base_keeps_the_lm_vectors(tmp_path: Path, tiny_bert_dir: Path) -> None:
    rec = Recommender.from_base(str(tiny_bert_dir), tmp_path, history_max_items=3, device="cpu")
    assert rec.scorer == "mean" and rec.user_dim == 33 and rec.keeps_lm_vectors
    assert rec.version == f"local-{tiny_bert_dir.name}" and rec.history_len == 3
    rows = rec.item_rows(np.eye(32, dtype=np.float32)[:2], ["a", "b"], [0.0, np.e - 1])
    assert rows.shape == (2, 33) and rows[1, -1] == pytest.approx(0.05)
    with pytest.raises(FileNotFoundError, match="neither a bundled name"):
        Recommender.from_base(str(tmp_path / "nope"), tmp_path)


def test_encoder_from_a_base_name(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """The constructor the benchmarks and training use: named after the base unless told."""
    from cprec.encoder import HFEncoder

    enc = HFEncoder.from_base(str(tiny_bert_dir), tmp_path, device="cpu", dtype="float32")
    assert enc.name == f"local-{tiny_bert_dir.name}" and enc.pooling == "mean"
    named = HFEncoder.from_base(str(tiny_bert_dir), tmp_path, name="minilm-l6", device="cpu")
    assert named.name == "minilm-l6"
