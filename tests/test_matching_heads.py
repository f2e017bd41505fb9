"""Temporal matching heads: values by hand, order sensitivity, and the order-pair cache end to end."""
import pytest
import torch

from cachegen import order_cache
from pipeline.fewshot import heads
from pipeline.fewshot.evaluate import evaluate
from pipeline.fewshot.heads.otam import alignment_cost
from pipeline.fewshot.train import TrainConfig, train


def test_step_reductions_by_hand():
    sims = torch.tensor([[0.9, 0.8], [0.3, 0.5]])          # query steps x support steps
    assert heads.build("diag").match(sims).item() == pytest.approx(0.7)
    assert heads.build("max").match(sims).item() == pytest.approx(0.9)
    # rows' best 0.9, 0.5 -> 0.7; columns' best 0.9, 0.8 -> 0.85; halved sum 0.775
    assert heads.build("bimhm").match(sims).item() == pytest.approx(0.775)


def test_otam_cost_by_hand():
    d = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    # padded [[0, .1, .9, 0], [0, .8, .2, 0]]: row 0 cumulates 0, .1, 1.0, 1.0; row 1: 0, .8 + 0,
    # .2 + min(.1, .8) = .3, then the free end 0 + min(1.0, 1.0, .3) = .3: the diagonal path
    assert alignment_cost(d, 1e-4).item() == pytest.approx(0.3, abs=1e-3)
    soft = alignment_cost(d, 1.0).item()
    assert soft < 0.3                                     # a smoothed minimum lies below the minimum
    both = heads.build("otam", {"bidirectional": "true", "smoothing": "1e-4"}).match(1 - d)
    assert both.item() == pytest.approx(-0.6, abs=2e-3)   # 0.3 each way


def test_order_matters_to_otam_and_diag_not_to_bimhm_and_max():
    g = torch.Generator().manual_seed(0)
    steps = torch.randn(3, 768, generator=g)
    support = steps[None, None]                           # (N=1, K=1, T, D)
    queries = torch.stack([steps, steps.flip(0)])         # same order, reversed
    for name, sensitive in (("otam", True), ("diag", True), ("bimhm", False), ("max", False)):
        h = heads.build(name, {"smoothing": 0.01} if name == "otam" else {})
        s = h(support, queries)[:, 0]
        assert (s[0] > s[1] + 0.1) if sensitive else torch.allclose(s[0], s[1]), name


def test_batched_scores_equal_one_episode_at_a_time():
    g = torch.Generator().manual_seed(1)
    sup, qry = torch.randn(4, 5, 2, 3, 16, generator=g), torch.randn(4, 7, 3, 16, generator=g)
    for name in ("diag", "max", "bimhm", "otam"):
        h = heads.build(name)
        z_s, z_q = h.encode(sup), h.as_query(h.encode(qry))
        one = torch.stack([h.scores(z_s[e], z_q[e]) for e in range(4)])
        assert torch.allclose(h.scores(z_s, z_q), one, atol=1e-6), name


def test_on_order_pairs_otam_separates_what_bimhm_cannot(tmp_path):
    cache = order_cache(tmp_path / "order.h5")
    fast = dict(n_way=2, k_shot=1, q_query=2, val_episodes=20, val_query=5)
    for name in ("otam", "bimhm"):
        train(cache, tmp_path / name, TrainConfig(head=name, **fast), progress=False)   # no parameters: scored once
    res, _ = evaluate([tmp_path / "otam", tmp_path / "bimhm"], cache, n_way=2, q_query=5, episodes=50, runs=2)
    otam, bimhm = res
    assert otam["accuracy"] > 0.95 and abs(bimhm["accuracy"] - 0.5) < 0.15
