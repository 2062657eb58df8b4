"""``python -m training``: stages from YAML + overrides; bad input exits 2 naming file:line."""

import json

import pytest
from train_util import TINY_CONFIG, build_tiny_llama

from training.__main__ import main
from training.config import load_config


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-cli"))


def _files(tmp_path, bad: bool):
    cat = tmp_path / "items.csv"
    cat.write_text(
        "item_id,domain,title\n"
        + "".join(f"f{i},Food,coffee roast n{i}\n" for i in range(6))
        + "".join(f"k{i},Kitchen,pan steel n{i}\n" for i in range(6)),
        encoding="utf-8",
    )
    rows = [f"u{u},{d}{(u + j) % 6},{j}" for u in range(4) for j, d in enumerate("fkfkf")]
    if bad:
        rows.insert(2, "u9,nope,3")  # line 4 of the file (header + 2 rows before it)
    inter = tmp_path / "inter.csv"
    inter.write_text("user_id,item_id,position\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return cat, inter


def _args(tmp_path, llama, cat, inter):
    return [
        "--config",
        str(TINY_CONFIG),
        "--set",
        f"model.base={llama}",
        "--set",
        f"output_dir={tmp_path / 'run'}",
        "--set",
        "data.source=files",
        "--set",
        f"data.catalog={cat}",
        "--set",
        f"data.interactions={inter}",
    ]


def test_corpus_stage_from_files(tmp_path, llama, capsys):
    cat, inter = _files(tmp_path, bad=False)
    assert main(["corpus", *_args(tmp_path, llama, cat, inter)]) == 0
    out = capsys.readouterr().out
    assert "corpus: 4 users" in out and "mixed:" in out
    stats = json.loads((tmp_path / "run" / "corpus" / "corpus_stats.json").read_text())
    assert stats["by_kind"]["domain"]["sequences"] > 0


def test_bad_rows_exit_2_then_skip(tmp_path, llama, capsys):
    cat, inter = _files(tmp_path, bad=True)
    assert main(["corpus", *_args(tmp_path, llama, cat, inter)]) == 2
    err = capsys.readouterr().err
    assert f"{inter}:4: item_id 'nope' is not in the catalogue" in err
    assert main(["corpus", "--skip-bad-rows", *_args(tmp_path, llama, cat, inter)]) == 0


def test_unknown_key_is_an_error():
    with pytest.raises(ValueError, match="cpt.stepz"):
        load_config(TINY_CONFIG, ["cpt.stepz=3"])
    cfg = load_config(TINY_CONFIG, ["cpt.schedule.kind=cosine", "cpt.anneal_domains=[Food]"])
    assert cfg.cpt.schedule.kind == "cosine" and cfg.cpt.anneal_domains == ["Food"]
