"""Temporal matching heads: values by hand, order sensitivity, and the order-pair cache end to end."""
import pytest
import torch

from cachegen import order_cache
from pipeline.fewshot import heads
from pipeline.fewshot.evaluate import evaluate
from pipeline.fewshot.heads.otam import alignment_cost
from pipeline.fewshot.train import TrainConfig, train

PLAIN = dict(projection=0, weight=1.0, learn_weight=False, temperature=1.0)     # the study's wrapping off


def test_step_reductions_by_hand():
    sims = torch.tensor([[0.9, 0.8], [0.3, 0.5]])          # query steps x support steps
    assert heads.build("diag", PLAIN, 4).match(sims).item() == pytest.approx(0.7)
    assert heads.build("max", PLAIN, 4).match(sims).item() == pytest.approx(0.9)
    # rows' best 0.9, 0.5 -> 0.7; columns' best 0.9, 0.8 -> 0.85; halved sum 0.775
    assert heads.build("bimhm", {}, 4).match(sims).item() == pytest.approx(0.775)
    assert heads.build("mean", {"form": "matching"}, 4).match(sims).item() == pytest.approx(1.25)   # (1.7 + .8) / 2
    assert heads.build("chamfer", PLAIN, 4).match(sims).item() == pytest.approx(0.775)


def test_otam_cost_by_hand():
    d = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    # padded [[0, .1, .9, 0], [0, .8, .2, 0]]: row 0 cumulates 0, .1, 1.0, 1.0; row 1: 0, .8 + 0,
    # .2 + min(.1, .8) = .3, then the free end 0 + min(1.0, 1.0, .3) = .3: the diagonal path
    assert alignment_cost(d, 1e-4).item() == pytest.approx(0.3, abs=1e-3)
    soft = alignment_cost(d, 1.0).item()
    assert soft < 0.3                                     # a smoothed minimum lies below the minimum
    both = heads.build("otam", {"bidirectional": "true", "smoothing": "1e-4"}, 4).match(1 - d)
    assert both.item() == pytest.approx(-0.6, abs=2e-3)   # 0.3 each way


def test_order_matters_to_otam_and_diag_not_to_bimhm_and_max():
    g = torch.Generator().manual_seed(0)
    steps = torch.randn(3, 32, generator=g)
    support = steps[None, None]                           # (N=1, K=1, T, D)
    queries = torch.stack([steps, steps.flip(0)])         # same order, reversed
    for name, sensitive in (("otam", True), ("diag", True), ("bimhm", False), ("max", False)):
        h = heads.build(name, dict(PLAIN, clips=3, **({"smoothing": 0.01} if name == "otam" else {})), 32)
        s = h(support, queries)[:, 0]
        assert (s[0] > s[1] + 0.1) if sensitive else torch.allclose(s[0], s[1]), name


def test_batched_scores_equal_one_episode_at_a_time():
    g = torch.Generator().manual_seed(1)
    sup, qry = torch.randn(4, 5, 2, 4, 16, generator=g), torch.randn(4, 7, 4, 16, generator=g)
    for name, cls in sorted(heads.HEADS.items()):
        if not cls.batched:
            continue
        h = heads.build(name, {"clips": 4, **({"dim": 8} if name == "trx" else {})}, 16).eval()
        z_s, z_q = h.encode(sup.flatten(0, 2)).unflatten(0, (4, 5, 2)), h.as_query(h.encode(qry.flatten(0, 1)))
        z_q = z_q.unflatten(0, (4, 7))
        one = torch.stack([h.scores(z_s[e], z_q[e]) for e in range(4)])
        assert torch.allclose(h.scores(z_s, z_q), one, atol=1e-5), name


def test_on_order_pairs_otam_separates_what_bimhm_cannot(tmp_path):
    cache = order_cache(tmp_path / "order.h5")
    fast = dict(n_way=2, k_shot=1, q_query=2, val_episodes=20, val_query=5)
    for name in ("otam", "bimhm"):
        train(cache, tmp_path / name, TrainConfig(head=name, head_options={"clips": 3}, **fast),
              progress=False)   # no parameters: scored once
    res, _ = evaluate([tmp_path / "otam", tmp_path / "bimhm"], cache, n_way=2, q_query=5, episodes=50, runs=2)
    otam, bimhm = res
    assert otam["accuracy"] > 0.95 and abs(bimhm["accuracy"] - 0.5) < 0.15


def test_segment_picks_by_hand():
    import numpy as np
    from pipeline.fewshot.features import segment_picks
    # 7 clips in 3 segments [0, 2), [2, 4), [4, 7): middles 0, 2, 5; 2 clips repeat in order; 3 clips are 0, 1, 2
    assert segment_picks(np.array([7, 2, 3]), 3).tolist() == [[0, 2, 5], [0, 0, 1], [0, 1, 2]]
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert segment_picks(np.array([3, 3]), 3, rng).tolist() == [[0, 1, 2]] * 2
    assert rng.bit_generator.state == state                  # one clip per segment: nothing drawn
    draws = np.stack([segment_picks(np.array([12]), 3, rng)[0] for _ in range(200)])
    assert draws.min(0).tolist() == [0, 4, 8] and draws.max(0).tolist() == [3, 7, 11]


def test_dense_cache_of_varying_lengths_trains_and_evaluates(tmp_path):
    import numpy as np
    from cachegen import write_cache
    from pipeline.fewshot.features import FeatureError, load
    from pipeline.store import FeatureStore
    rng = np.random.default_rng(0)
    data, parts = {}, {}
    for p in range(4):          # reversed pairs; each video 5-12 clips in three phases
        base = rng.normal(size=(3, 768))
        for r, seq in enumerate((base, base[::-1])):
            name = f"pair{p}_{r}"
            videos = []
            for _ in range(12):
                n = int(rng.integers(5, 13))
                phase = np.minimum(np.arange(n) * 3 // n, 2)
                videos.append((seq[phase] + 0.3 * rng.normal(size=(n, 768))).astype(np.float32))
            data[name], parts[name] = videos, ("test" if p == 3 else "val" if p == 2 else "train")
    cache = write_cache(tmp_path / "dense.h5", data, parts)
    with FeatureStore(cache) as st:
        feats = load(st, "test", "pooled")
    assert feats.count.min() < feats.count.max() and feats.inputs([0, 1], clips=3).shape == (2, 3, 768)
    with pytest.raises(FeatureError, match="--head-opt clips=T"):
        feats.inputs([0, 1])
    fast = dict(n_way=2, k_shot=1, q_query=2, val_every=100, val_episodes=20, val_query=5, lr=3e-3)
    train(cache, tmp_path / "lstm", TrainConfig(head="lstm", head_options={"hidden": 32}, episodes=200, **fast),
          progress=False)
    train(cache, tmp_path / "otam", TrainConfig(head="otam", head_options={"clips": 3}, **fast), progress=False)
    train(cache, tmp_path / "mean", TrainConfig(head="mean", **fast), progress=False)
    res, _ = evaluate([tmp_path / "lstm", tmp_path / "otam", tmp_path / "mean"], cache, n_way=2, q_query=5,
                      episodes=50, runs=2)
    lstm, otam, mean = res
    assert lstm["accuracy"] > 0.8 and otam["accuracy"] > 0.9 and abs(mean["accuracy"] - 0.5) < 0.15   # chance 0.5
