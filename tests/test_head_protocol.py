"""Every registered head keeps the protocol: columns depend on their own class only, its own loss
moves every class, bad options are refused in one line, and it trains and evaluates on caches of
any feature size (R(2+1)D 512, MFNet 768, ResNet-50 2048)."""
import dataclasses

import numpy as np
import pytest
import torch

from cachegen import write_cache
from pipeline.errors import ConfigError
from pipeline.fewshot import heads
from pipeline.fewshot.evaluate import evaluate
from pipeline.fewshot.losses import ACCEPTS, LOSSES, PER_VIDEO, check_loss, episode_loss
from pipeline.fewshot.train import TrainConfig, train

# small sizes so that each head builds and runs in milliseconds; defaults otherwise
SMALL = {"chamfer": {"projection": 16, "clips": 4}, "diag": {"projection": 16, "clips": 4},
         "max": {"projection": 16, "clips": 4}, "linear": {"projection": 16, "clips": 4},
         "visil": {"projection": 16, "clips": 4}, "otam": {"clips": 4}, "bimhm": {"clips": 4},
         "mean": {"clips": 4}, "trx": {"dim": 16}, "lstm": {"hidden": 16}}
NAMES = sorted(heads.HEADS)


def build(name, d, **extra):
    torch.manual_seed(0)
    return heads.build(name, {**SMALL.get(name, {}), **extra}, d).double().eval()


def video_input(head, b, d, g):
    """Raw features of `b` videos as `head` reads them from the cache."""
    if head.consumes == "maps":
        return torch.randn(b, d, 2, 2, 2, generator=g, dtype=torch.float64)
    return torch.randn(b, head.clips or 3, d, generator=g, dtype=torch.float64)


def test_every_head_is_covered():
    assert {"bimhm", "chamfer", "diag", "linear", "lstm", "max", "mean", "otam", "rvn1", "rvn2", "rvn3", "trx",
            "visil"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_a_class_column_depends_only_on_its_own_support(name):
    g = torch.Generator().manual_seed(1)
    head = build(name, 24)
    support, queries = video_input(head, 3 * 2, 24, g).unflatten(0, (3, 2)), video_input(head, 4, 24, g)
    with torch.no_grad():
        before = head(support, queries)
        changed = support.clone()
        changed[1] = video_input(head, 2, 24, g)
        after = head(changed, queries)
        alone = head(support[2:], queries)
    assert before.shape == (4, 3) and torch.isfinite(before).all()
    assert not torch.allclose(before[:, 1], after[:, 1])
    assert torch.allclose(before[:, [0, 2]], after[:, [0, 2]], rtol=0, atol=1e-12)
    assert torch.allclose(before[:, 2:], alone, rtol=0, atol=1e-12)      # a class scored on its own


@pytest.mark.parametrize("name", NAMES)
def test_every_loss_it_accepts_pulls_every_class(name):
    """The gradient of each loss the head accepts (its own included) reaches the positive and every
    negative class of each query."""
    g = torch.Generator().manual_seed(2)
    head = build(name, 24)
    kind, own = head.scoring(head.options)
    support, queries = video_input(head, 5, 24, g).unflatten(0, (5, 1)), video_input(head, 5, 24, g)
    with torch.no_grad():
        scores = head(support, queries).float()
    accepted = [loss for loss in LOSSES if loss not in PER_VIDEO and kind in ACCEPTS[loss]]
    assert own in accepted
    for loss in accepted:
        sims = scores.clone().requires_grad_(True)
        episode_loss(loss, sims, torch.arange(5), gamma=128.0, m=0.4, scale=10.0 if kind == "cosine" else 1.0).backward()
        assert (sims.grad != 0).all(), (name, loss, sims.grad)


def test_circle_loss_is_refused_where_it_would_leave_the_negatives_still():
    """Why check_loss exists: on TRX-scale scores (minus squared distances) circle loss gives every
    negative class exactly zero gradient."""
    sims = torch.tensor([[-30.0, -45.0, -52.0]], requires_grad=True)
    episode_loss("circle", sims, torch.tensor([0]), gamma=128.0, m=0.4, scale=1.0).backward()
    assert sims.grad[0, 0] < 0 and (sims.grad[0, 1:] == 0).all()
    for name in NAMES:
        cls = heads.get(name)
        kind, own = cls.scoring(heads.parse_options(cls, {}))
        check_loss(own, name, kind, own)
        for loss in set(LOSSES) - set(PER_VIDEO):
            if kind in ACCEPTS[loss]:
                check_loss(loss, name, kind, own)
            else:
                with pytest.raises(ConfigError, match=f"use --loss {own}"):
                    check_loss(loss, name, kind, own)
    with pytest.raises(ConfigError, match="circle loss assumes cosine"):
        TrainConfig(head="trx", loss="circle")


def outside(meta, kind):
    """A value just outside an option's declared range."""
    if meta.get("low") is not None:
        return meta["low"] - 1
    if meta.get("above") is not None:
        return meta["above"]
    return meta["below"]


@pytest.mark.parametrize("name", NAMES)
def test_every_ranged_option_refuses_values_out_of_range(name):
    cls = heads.get(name)
    checked = 0
    for field, typ, default, meta in heads.option_fields(cls):
        if not heads.valid_range(meta):
            continue
        bad = outside(meta, typ)
        value = ",".join([str(bad)] * max(1, len(default))) if isinstance(default, tuple) else str(bad)
        with pytest.raises(ConfigError, match=f"{field}=") as e:
            heads.parse_options(cls, {field: value})
        assert "\n" not in str(e.value) and heads.valid_range(meta) in str(e.value)
        if typ in (float, "float"):
            for v in ("nan", "inf"):
                with pytest.raises(ConfigError, match=field):
                    heads.parse_options(cls, {field: v})
        checked += 1
    assert checked or not heads.option_fields(cls)


def test_the_bad_options_of_the_review_are_refused():
    for name, opts in [("otam", {"smoothing": "0"}), ("otam", {"smoothing": "-0.1"}), ("trx", {"tuple_sizes": "0"}),
                       ("trx", {"tuple_sizes": ""}), ("trx", {"dim": "0"}), ("chamfer", {"projection": "-1"}),
                       ("chamfer", {"tuple_length": "0"}), ("chamfer", {"weight": "0"}), ("trx", {"tuple_sizes": "2,9"}), ("chamfer", {"tuple_length": "9"})]:
        with pytest.raises(ConfigError, match=name):
            heads.build(name, opts, 768)


def cache_of_size(path, d, seed=0):
    """Six classes (4 train, 1 val, 1 test... doubled for 2-way val/test), 5 videos of 8 clips each,
    separable by their mean direction."""
    rng = np.random.default_rng(seed)
    parts = dict(zip("abcdefgh", ["train"] * 4 + ["val"] * 2 + ["test"] * 2))
    data = {c: (rng.normal(size=(1, 1, d)) + 0.5 * rng.normal(size=(5, 8, d))).astype(np.float32) for c in parts}
    return write_cache(path, data, parts, map_shape=(d, 2, 1, 1))


@pytest.mark.parametrize("d", [512, 2048])
def test_every_head_trains_and_evaluates_on_another_feature_size(d, tmp_path):
    cache = cache_of_size(tmp_path / f"d{d}.h5", d)
    runs = []
    for name in NAMES:
        opts = {k: v for k, v in SMALL.get(name, {}).items() if k != "clips"}
        cfg = TrainConfig(head=name, head_options=opts, episodes=2, n_way=2, q_query=1, val_every=2, val_episodes=2,
                          val_query=1, lr=1e-3)
        train(cache, tmp_path / name, cfg, progress=False, log=lambda *a: None)
        runs.append(tmp_path / name / "seed-0" / "best.pt")
    results, _ = evaluate(runs, cache, n_way=2, k_shot=1, q_query=2, episodes=4, runs=1)
    for name, r in zip(NAMES, results):
        assert 0 <= r["accuracy"] <= 1, name
        assert torch.load(tmp_path / name / "seed-0" / "best.pt", weights_only=False)["cache"]["feature_size"] == d


def test_tables_show_the_options_that_differ_from_the_defaults():
    full = dataclasses.asdict(heads.parse_options(heads.get("chamfer"), {"clips": "3", "tuples": "consecutive"}))
    assert heads.changed_options("chamfer", full) == {"clips": 3, "tuples": "consecutive"}
    assert heads.changed_options("trx", dataclasses.asdict(heads.parse_options(heads.get("trx"), {}))) == {}
    assert heads.changed_options("not-loaded", {"a": 1}) == {"a": 1}
