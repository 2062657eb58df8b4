import math

import pytest
import torch

from training.schedule import anneal_start_step, cosine_lambda, make_scheduler, wsa_lambda


def lrs(f, n):
    return [f(s) for s in range(n)]


@pytest.mark.parametrize("shape", ["linear", "cosine", "exponential"])
def test_wsa_phases(shape):
    n = 100
    f = wsa_lambda(n, warmup_frac=0.1, anneal_frac=0.2, min_ratio=0.1, shape=shape)
    v = lrs(f, n)
    assert v[0] == pytest.approx(0.1)  # first warmup step: 1/10 of the peak
    assert v[9] == pytest.approx(1.0)  # warmup end = peak
    assert all(x < 1.0 for x in v[:9]) and v[:10] == sorted(v[:10])
    assert all(x == 1.0 for x in v[10:80])  # stable: flat at the peak
    assert v[99] == pytest.approx(0.1)  # end of annealing = min ratio
    tail = v[80:]
    assert tail == sorted(tail, reverse=True) and all(0.1 - 1e-9 <= x < 1.0 for x in tail)
    assert anneal_start_step(n, 0.2) == 80


def test_anneal_shapes_differ_at_midpoint():
    mid = {s: wsa_lambda(100, 0.0, 0.5, 0.1, s)(74) for s in ("linear", "cosine", "exponential")}
    assert mid["linear"] == pytest.approx(0.55)
    assert mid["cosine"] == pytest.approx(0.55)  # cosine and linear meet at the midpoint
    assert mid["exponential"] == pytest.approx(math.sqrt(0.1))  # geometric midpoint
    q = {s: wsa_lambda(100, 0.0, 0.5, 0.1, s)(61) for s in ("linear", "cosine")}
    assert q["cosine"] > q["linear"]  # cosine stays higher early in the anneal


def test_cosine_ablation_decays_from_warmup_end():
    f = cosine_lambda(100, warmup_frac=0.1, min_ratio=0.1)
    v = lrs(f, 100)
    assert v[9] == pytest.approx(1.0)
    assert v[30] < 1.0 and v[99] == pytest.approx(0.1)
    assert v[10:] == sorted(v[10:], reverse=True)


def test_lambdalr_drives_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sch = make_scheduler(
        opt, "wsa", 10, warmup_frac=0.2, anneal_frac=0.2, min_ratio=0.5, shape="linear"
    )
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert seen[1] == pytest.approx(2.0) and seen[5] == pytest.approx(2.0)
    assert seen[-1] == pytest.approx(1.0)


def test_bad_fractions_refused():
    with pytest.raises(ValueError):
        wsa_lambda(10, warmup_frac=0.6, anneal_frac=0.6)
