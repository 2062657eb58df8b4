"""bench/flat_systems.py: each flat row of the quality table changes only its own setting."""

from train_util import TINY_CONFIG

from bench.flat_systems import ROWS, SYSTEMS, system_config
from training.config import load_config
from training.pipeline import cpt_dir


def test_benchmark_systems_change_only_their_setting(tmp_path):
    base = load_config(TINY_CONFIG, [f"output_dir={tmp_path}"])
    cfgs = {name: system_config(name, base) for name in SYSTEMS}
    assert not cfgs["finetune-only"].cpt.enabled and cfgs["cprec"].cpt.enabled
    assert cfgs["cprec"].cpt.schedule.kind == "wsa"
    assert cfgs["cprec-cosine"].cpt.schedule.kind == "cosine"
    assert cfgs["cprec-domain-only"].corpus.mixed_ratio == 0.0
    assert cfgs["cprec-idres"].finetune.item_id_residual
    assert cfgs["cprec"].output_dir == tmp_path / "cprec"
    # cprec and cprec-idres share one CPT run; the ablations get their own
    assert cpt_dir(cfgs["cprec"]) == cpt_dir(cfgs["cprec-idres"])
    assert cpt_dir(cfgs["cprec"]).parent == tmp_path / "_cpt"
    assert cpt_dir(cfgs["cprec"]) != cpt_dir(cfgs["cprec-cosine"])
    assert base.cpt.schedule.kind == "wsa"  # the caller's config is not mutated
    assert cpt_dir(base) == tmp_path / "cpt"  # a run of its own keeps CPT beside it
    assert set(ROWS.values()) == set(SYSTEMS)
