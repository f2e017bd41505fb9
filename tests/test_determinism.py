"""The same inputs give the same numbers: evaluation does not depend on the thread count, training is
repeatable for a given thread count, and identical evaluations write byte-identical metrics."""
import numpy as np
import pytest
import torch

from cachegen import order_cache
from pipeline.fewshot import checkpoint
from pipeline.fewshot.evaluate import encode_all, evaluate, write_metrics
from pipeline.fewshot.features import load
from pipeline.fewshot.train import TrainConfig, train
from pipeline.store import FeatureStore

FAST = dict(n_way=2, k_shot=1, q_query=2, val_every=40, val_episodes=10, val_query=5, episodes=40)
HEADS = [("lstm", dict(clips=3, hidden=32)), ("otam", dict(clips=3, per_step=True)), ("trx", dict(clips=3)),
         ("chamfer", dict(clips=3)), ("mean", dict(clips=3))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("det")
    cache = order_cache(d / "c.h5")
    for name, opts in HEADS:
        train(cache, d / name, TrainConfig(head=name, head_options=opts, **FAST), progress=False)
    return d, cache


def scores_with_threads(head, feats, episodes, threads):
    """Every episode's scores (E, N*Q, N), computed with `threads` threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            x = torch.from_numpy(np.asarray(feats.inputs(np.arange(len(feats.ids)), clips=head.clips), np.float32))
            z = encode_all(head, x)
            zq = head.as_query(z)
            out = [head.scores(z[ep[:, :1]], zq[ep[:, 1:].reshape(-1)]) for ep in torch.from_numpy(episodes)]
        return torch.stack(out)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("name", [h for h, _ in HEADS])
def test_scores_are_bitwise_the_same_with_1_2_and_4_threads(runs, name):
    d, cache = runs
    head = checkpoint.load(d / name / "seed-0" / "best.pt").build_head()
    with FeatureStore(cache) as st:
        feats = load(st, "test", head.view, views=1)
    rng = np.random.default_rng(0)
    by_class = list(feats.by_class().values())
    episodes = np.stack([np.stack([rng.choice(by_class[c], 6, replace=False) for c in rng.choice(len(by_class), 2,
                                                                                                replace=False)])
                         for _ in range(20)])                                     # (E, N, 1 + Q)
    one = scores_with_threads(head, feats, episodes, 1)
    for threads in (2, 4):
        assert torch.equal(one, scores_with_threads(head, feats, episodes, threads)), threads


def test_training_twice_gives_the_same_weights_and_evaluating_twice_the_same_bytes(runs, tmp_path):
    d, cache = runs
    train(cache, tmp_path / "again", TrainConfig(head="lstm", head_options=dict(clips=3, hidden=32), **FAST),
          progress=False)
    a = checkpoint.load(d / "lstm" / "seed-0" / "best.pt").state_dict
    b = checkpoint.load(tmp_path / "again" / "seed-0" / "best.pt").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("x.json", "y.json"):
        results, _ = evaluate([d / "lstm"], cache, n_way=2, q_query=2, episodes=50, runs=2)
        write_metrics(tmp_path / name, results[0])
    assert (tmp_path / "x.json").read_bytes() == (tmp_path / "y.json").read_bytes()
