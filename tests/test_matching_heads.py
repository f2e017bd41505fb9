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
    train(cache, tmp_path / "otam", TrainConfig(head="otam", **fast), progress=False)
    train(cache, tmp_path / "mean", TrainConfig(head="mean", **fast), progress=False)
    res, _ = evaluate([tmp_path / "lstm", tmp_path / "otam", tmp_path / "mean"], cache, n_way=2, q_query=5,
                      episodes=50, runs=2)
    lstm, otam, mean = res
    assert lstm["accuracy"] > 0.8 and otam["accuracy"] > 0.9 and abs(mean["accuracy"] - 0.5) < 0.15   # chance 0.5


def test_chamfer_tuples_pool_the_shots_and_learn():
    h = heads.build("chamfer", {"dim": 16, "tuple_length": 2})
    x = torch.randn(2, 5, 768)
    z = h.encode(x)
    assert z.shape == (2, 4, 16) and torch.allclose(z.norm(dim=-1), torch.ones(2, 4), atol=1e-5)
    # tuple u is clips u, u+1 concatenated: the first tuple depends on clips 0 and 1 only
    y = x.clone()
    y[:, 2:] += 1
    assert torch.allclose(h.encode(y)[:, 0], z[:, 0], atol=1e-6)
    sup, qry = torch.randn(3, 2, 5, 768), torch.randn(4, 5, 768)          # 3-way 2-shot, 4 queries
    s = h(sup, qry)
    zs, zq = h.encode(sup.flatten(0, 1)).unflatten(0, (3, 2)), h.encode(qry)
    pooled = zs[1].flatten(0, 1)                                              # class 1's 8 tuples
    sims = zq[0] @ pooled.T                                                   # (4 query tuples, 8)
    assert s[0, 1].item() == pytest.approx(0.5 * (sims.amax(1).mean() + sims.amax(0).mean()).item(), abs=1e-5)
    s.sum().backward()
    assert h.log_scale.grad is not None and h.proj.weight.grad.abs().sum() > 0


def test_trx_tuples_attention_and_prototype_by_hand():
    h = heads.build("trx", {"clips": 4, "tuple_sizes": "2,3", "dim": 8})
    x = torch.randn(3, 4, 768)
    z = h.encode(x)
    assert [len(t) for t in h.tuples] == [6, 4]                               # C(4, 2), C(4, 3)
    assert z.shape == (3, 10, 16)
    y = x.clone()
    y[:, 3] += 1                                                              # tuple (0, 1) does not hold clip 3
    assert torch.allclose(h.encode(y)[:, 0], z[:, 0]) and not torch.allclose(h.encode(y)[:, 2], z[:, 2])
    sup, qry = torch.randn(2, 2, 4, 768), torch.randn(1, 4, 768)              # 2-way 2-shot, 1 query
    s = h(sup, qry)
    zs, zq = h.encode(sup.flatten(0, 1)).unflatten(0, (2, 2)), h.encode(qry)
    total = 0
    for start, n in ((0, 6), (6, 4)):                                         # class 1, by the formula
        k, v = zs[1, :, start:start + n, :8].flatten(0, 1), zs[1, :, start:start + n, 8:].flatten(0, 1)
        qk, qv = zq[0, start:start + n, :8], zq[0, start:start + n, 8:]
        proto = torch.softmax(qk @ k.T / 8 ** 0.5, -1) @ v
        total = total - ((qv - proto) ** 2).sum(-1).mean()
    assert s[0, 1].item() == pytest.approx(total.item() / 2, rel=1e-5)
    s.sum().backward()
    assert all(p.grad is not None for p in h.parameters())
    with pytest.raises(ValueError, match="not a valid comma-separated ints"):
        heads.build("trx", {"tuple_sizes": "2,x"})


def slow_otam(d, lam):
    """OTAM's cumulative cost by the definition, cell by cell in plain Python floats."""
    import math
    rows, cols = len(d), len(d[0]) + 2
    padded = [[0.0] + list(r) + [0.0] for r in d]

    def softmin(*xs):
        return -lam * math.log(sum(math.exp(-x / lam) for x in xs))
    g = [[0.0] * cols for _ in range(rows)]
    for i in range(rows):
        for j in range(cols):
            if i == 0:
                g[i][j] = padded[i][j] + (g[i][j - 1] if j else 0.0)
            elif j == 0:
                g[i][j] = padded[i][j] + g[i - 1][j]
            elif j == cols - 1:
                g[i][j] = padded[i][j] + softmin(g[i - 1][j - 1], g[i][j - 1], g[i - 1][j])
            else:
                g[i][j] = padded[i][j] + softmin(g[i - 1][j - 1], g[i][j - 1])
    return g[-1][-1]


@pytest.mark.parametrize("n,k,m,t", [(2, 1, 3, 3), (3, 2, 2, 5), (5, 3, 4, 8), (2, 1, 1, 1)])
def test_step_matchers_equal_a_slow_reference_written_with_loops(n, k, m, t):
    g = torch.Generator().manual_seed(n * 100 + t)
    support = torch.randn(n, k, t, 6, generator=g, dtype=torch.float64)
    queries = torch.randn(m, t, 6, generator=g, dtype=torch.float64)

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    def reduce(name, s):                 # s: Tq x Ts similarity lists
        if name == "diag":
            return sum(s[i][i] for i in range(t)) / t
        if name == "max":
            return max(max(r) for r in s)
        if name == "bimhm":
            return 0.5 * (sum(max(r) for r in s) / t + sum(max(s[i][j] for i in range(t)) for j in range(t)) / t)
        both = [[1 - x for x in r] for r in s]
        return -(slow_otam(both, 0.1) + slow_otam([list(c) for c in zip(*both)], 0.1))
    for name in ("diag", "max", "bimhm", "otam"):
        opts = {"clips": t, **({"bidirectional": True, "smoothing": 0.1} if name == "otam" else {})}
        ours = heads.build(name, opts)(support, queries)
        for q in range(m):
            for c in range(n):
                ref = sum(reduce(name, [[cos(queries[q, i], support[c, s, j]) for j in range(t)] for i in range(t)])
                          for s in range(k)) / k
                assert ours[q, c].item() == pytest.approx(ref, abs=1e-9), (name, q, c)
