import numpy as np
import pytest
import torch

from pipeline.fewshot import heads
from pipeline.fewshot.episodes import EpisodeError, EpisodeSampler, episode_file, fixed_episodes
from pipeline.fewshot.evaluate import evaluate
from pipeline.store import CacheMismatch
from pipeline.fewshot.train import TrainConfig, TrainingError, train

from cachegen import order_cache, write_cache


def test_sampler_invariants_and_determinism():
    videos = {c: np.arange(10 * i, 10 * i + 10) for i, c in enumerate("abcdefg")}
    s = EpisodeSampler(videos, n_way=5, k_shot=2, q_query=3)
    ep = s.sample(np.random.default_rng(0))
    assert ep.shape == (5, 5)
    assert len(set(ep[:, :2].ravel()) & set(ep[:, 2:].ravel())) == 0      # support and query disjoint
    assert len(set(ep.ravel())) == 25
    assert len({v // 10 for v in ep[:, 0]}) == 5                            # 5 different classes
    assert all(len({v // 10 for v in row}) == 1 for row in ep)             # each row one class
    assert np.array_equal(ep, s.sample(np.random.default_rng(0)))


def test_sampler_draws_every_video_and_role_uniformly():
    s = EpisodeSampler({"a": np.arange(4), "b": np.arange(4, 7)}, n_way=2, k_shot=1, q_query=1)
    rng = np.random.default_rng(0)
    counts = np.zeros((7, 2))                       # video x (support, query)
    for _ in range(12000):
        for row in s.sample(rng):
            counts[row, [0, 1]] += 1
    expected = np.array([1 / 4] * 4 + [1 / 3] * 3)[:, None]   # each class is in every episode
    assert np.abs(counts / 12000 - expected).max() < 0.02


def test_classes_with_too_few_videos_are_left_out_with_a_warning_or_refused():
    with pytest.warns(UserWarning, match=r"1 class\(es\) with fewer than K\+Q = 16 videos left out .*small \(3 videos\)"):
        s = EpisodeSampler({"small": np.arange(100, 103), "big": np.arange(30), "other": np.arange(30, 50)}, 2, 1, 15)
    assert s.classes == ["big", "other"] and s.excluded == ["small"]
    assert set(s.sample(np.random.default_rng(0)).ravel()) <= set(range(50))
    with pytest.raises(EpisodeError, match=r"need 2 classes with at least K\+Q = 16 videos; 1 of 2 have them "
                                           r"\(short: small \(3 videos\)\)"):
        EpisodeSampler({"small": np.arange(3), "big": np.arange(30)}, 2, 1, 15)


def test_fixed_episode_file_is_stable(tmp_path):
    ids = np.array([f"c{i // 20}/v{i}" for i in range(120)])
    by_class = {f"c{k}": np.arange(20 * k, 20 * k + 20) for k in range(6)}
    a = fixed_episodes(tmp_path / "x.h5", ids, by_class, "test", 5, 1, 15, 30, 0)
    path = episode_file(tmp_path / "x.h5", ids, "test", 5, 1, 15, 30, 0)
    assert path.exists() and a.shape == (30, 5, 16)
    # read back: the same episodes, without drawing (no class lists needed)
    assert np.array_equal(fixed_episodes(tmp_path / "x.h5", ids, {}, "test", 5, 1, 15, 30, 0), a)
    # a part that holds other videos (a cache replaced under the same name) draws its own episodes
    other = np.array([f"c{i // 20}/w{i}" for i in range(120)])
    c = fixed_episodes(tmp_path / "x.h5", other, by_class, "test", 5, 1, 15, 30, 0)
    assert episode_file(tmp_path / "x.h5", other, "test", 5, 1, 15, 30, 0) != path
    assert set(other[c].ravel()) <= set(other) and len(list(path.parent.glob("test-*.npz"))) == 2


def test_head_shapes_and_rvn_split_equals_concatenation():
    x = torch.randn(4, 3, 768)
    assert heads.build("lstm", {"hidden": 64}, 768).encode(x).shape == (4, 64)
    assert torch.allclose(heads.build("mean", {}, 768).encode(x), x.mean(1), atol=1e-6)
    for name in ("rvn1", "rvn2", "rvn3"):
        h = heads.build(name, {}, 768).eval()
        s, q = torch.randn(5, 2, 768, 8, 4, 4), torch.randn(7, 768, 8, 4, 4)    # 5-way 2-shot, 7 queries
        out = h(s, q)
        assert out.shape == (7, 5) and ((out > 0) & (out < 1)).all()
        assert torch.allclose(out, h.naive(s.mean(1), q), atol=1e-5)           # K-shot: the centroid's relation
    assert {"lstm", "mean", "rvn1", "rvn2", "rvn3", "otam", "bimhm", "diag", "max"} <= set(heads.HEADS)


def test_lstm_head_equals_torch_lstm_values_and_gradients():
    torch.manual_seed(0)
    head = heads.build("lstm", {"hidden": 32}, 768)
    x = torch.randn(6, 3, 768, requires_grad=True)
    ours = head.encode(x)
    _, (h, _) = head.lstm(x)                       # the same parameters through nn.LSTM
    assert torch.allclose(ours, h[-1], atol=1e-6)
    w = torch.randn(6, 32)                         # a loss that weights every output differently
    g_ours = torch.autograd.grad((w * ours).sum(), [x, *head.parameters()])
    g_ref = torch.autograd.grad((w * h[-1]).sum(), [x, *head.parameters()])
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(head.encode(x[:, :1]), head.lstm(x[:, :1])[1][0][-1], atol=1e-6)   # T = 1


def test_peephole_lstm_follows_the_papers_equations_values_and_gradients():
    """Against eqs. 3-7 written out unit by unit (float64, with `o * tanh(c)` for eq. 7's typo)."""
    torch.manual_seed(1)
    head = heads.build("lstm", {"hidden": 3, "peephole": True}, 768).double()
    with torch.no_grad():
        head.peephole.normal_()                    # zero at start: give the peepholes something to do
    x = torch.randn(2, 4, 768, dtype=torch.float64)
    ours = head.encode(x)
    assert ours.shape == (2, 3)
    p, peep = head.lstm, head.peephole

    def reference(x, w_ih, w_hh, b, peep):
        out = []
        sig = torch.sigmoid
        for v in range(x.shape[0]):
            h, c = [0.0] * 3, [0.0] * 3
            for t in range(x.shape[1]):
                pre = [b[r] + (w_ih[r] * x[v, t]).sum() + sum(w_hh[r, j] * h[j] for j in range(3)) for r in range(12)]
                new_c, new_h = [], []
                for u in range(3):                 # rows u, 3+u, 6+u, 9+u: gates i, f, g, o of unit u
                    i = sig(pre[u] + peep[0, u] * c[u])
                    f = sig(pre[3 + u] + peep[1, u] * c[u])
                    new_c.append(f * c[u] + i * torch.tanh(pre[6 + u]))
                    o = sig(pre[9 + u] + peep[2, u] * new_c[u])
                    new_h.append(o * torch.tanh(new_c[u]))
                h, c = new_h, new_c
            out.append(torch.stack(h))
        return torch.stack(out)

    args = (p.weight_ih_l0, p.weight_hh_l0, p.bias_ih_l0 + p.bias_hh_l0, peep)
    ref = reference(x, *args)
    assert torch.allclose(ours, ref, atol=1e-12)
    w = torch.randn(2, 3, dtype=torch.float64)
    params = [p.weight_ih_l0, p.weight_hh_l0, p.bias_ih_l0, peep]
    g_ours = torch.autograd.grad((w * ours).sum(), params)
    g_ref = torch.autograd.grad((w * reference(x, *args)).sum(), params)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-12) and a.abs().sum() > 0
    assert not torch.allclose(ours, reference(x, *args[:3], torch.zeros_like(peep)), atol=1e-3)   # they matter
    plain = heads.build("lstm", {"hidden": 3}, 768)
    zero = heads.build("lstm", {"hidden": 3, "peephole": True}, 768)            # zero peepholes: the standard cell
    zero.lstm.load_state_dict(plain.lstm.state_dict())
    assert torch.allclose(zero.encode(x.float()), plain.encode(x.float()), atol=1e-6)


FAST = dict(n_way=2, k_shot=1, q_query=2, val_every=100, val_episodes=40, val_query=5, lr=3e-3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return order_cache(tmp_path_factory.mktemp("c") / "order.h5")


def test_lstm_separates_order_only_classes_and_mean_cannot(cache, tmp_path):
    r = train(cache, tmp_path / "lstm", TrainConfig(head="lstm", head_options={"hidden": 64}, episodes=300, **FAST), progress=False)
    train(cache, tmp_path / "mean", TrainConfig(head="mean", **FAST), progress=False)
    res, _ = evaluate([tmp_path / "lstm/seed-0/best.pt", tmp_path / "mean/seed-0/best.pt"], cache, n_way=2, k_shot=1, q_query=5,
                      episodes=50, runs=2)
    lstm, mean = res
    assert r[0]["best_val"] > 0.9
    assert lstm["accuracy"] > 0.9
    assert abs(mean["accuracy"] - 0.5) < 0.15          # the two classes have the same mean
    assert mean["vs_best"]["diff"] < -0.3 and lstm["vs_best"] is None


def test_training_lowers_the_loss_and_is_deterministic(cache, tmp_path):
    cfg = TrainConfig(head="lstm", head_options={"hidden": 32}, episodes=200, **FAST)
    train(cache, tmp_path / "a", cfg, progress=False)
    train(cache, tmp_path / "b", cfg, progress=False)
    curve = __import__("json").loads((tmp_path / "a/seed-0/curve.json").read_text())
    assert curve[-1]["loss"] < curve[0]["loss"]
    a, b = torch.load(tmp_path / "a/seed-0/best.pt"), torch.load(tmp_path / "b/seed-0/best.pt")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert (tmp_path / "a/seed-0/curve.csv").read_text().startswith("episode,loss,val_accuracy")


def test_interrupted_training_resumes_to_the_same_result(cache, tmp_path, monkeypatch):
    cfg = TrainConfig(head="lstm", head_options={"hidden": 32}, episodes=300, **FAST)
    train(cache, tmp_path / "full", cfg, progress=False)
    import pipeline.fewshot.train as tr
    real, calls = tr.validate, []

    def stop_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tr, "validate", stop_on_second)
    with pytest.raises(KeyboardInterrupt):
        train(cache, tmp_path / "cut", cfg, progress=False)
    monkeypatch.setattr(tr, "validate", real)
    assert torch.load(tmp_path / "cut/seed-0/last.pt", weights_only=False)["episode"] == 100
    train(cache, tmp_path / "cut", cfg, progress=False)
    a = torch.load(tmp_path / "full/seed-0/last.pt", weights_only=False)
    b = torch.load(tmp_path / "cut/seed-0/last.pt", weights_only=False)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["resume"]["curve"] == b["resume"]["curve"]


def test_rvn_trains_with_mse(cache, tmp_path):
    r = train(cache, tmp_path / "rvn", TrainConfig(head="rvn3", loss="mse", episodes=100, **FAST), progress=False)
    assert 0 <= r[0]["best_val"] <= 1 and (tmp_path / "rvn/seed-0/best.pt").exists()


def test_nan_features_are_refused_naming_the_video_and_a_nan_loss_stops_naming_the_episode(tmp_path, monkeypatch):
    from pipeline.fewshot import train as train_module
    from pipeline.fewshot.features import FeatureError
    x = np.random.default_rng(0).normal(size=(6, 4, 3, 768)).astype(np.float32)
    parts = {"c0": "train", "c1": "train", "c2": "val", "c3": "val", "c4": "test", "c5": "test"}
    cfg = TrainConfig(head="lstm", head_options={"hidden": 8}, episodes=200, n_way=2, k_shot=1, q_query=1,
                      val_every=100, val_episodes=5, val_query=2)
    bad = x.copy()
    bad[0, 1, 0, 0] = np.nan
    with pytest.raises(FeatureError, match=r"non-finite values in the pooled features of 1 video\(s\) of part train \(c0/c0_1\)"):
        train(write_cache(tmp_path / "nan.h5", {f"c{i}": bad[i] for i in range(6)}, parts), tmp_path / "r1", cfg,
              progress=False)
    real, calls = train_module.episode_loss, []

    def diverges_at_episode_7(*a):
        calls.append(1)
        return real(*a) * (float("nan") if len(calls) == 7 else 1)
    monkeypatch.setattr(train_module, "episode_loss", diverges_at_episode_7)
    with pytest.raises(TrainingError, match=r"episode 7: loss is nan .* Last good checkpoint: none"):
        train(write_cache(tmp_path / "ok.h5", {f"c{i}": x[i] for i in range(6)}, parts), tmp_path / "r2", cfg,
              progress=False)


def test_eval_refuses_a_cache_with_other_settings(cache, tmp_path):
    train(cache, tmp_path / "m", TrainConfig(head="mean", **FAST), progress=False)
    other = order_cache(tmp_path / "other.h5")
    import h5py
    with h5py.File(other, "a") as f:
        f.attrs["settings_hash"] = "0000"
        f.attrs["settings"] = '{"dtype": "float16"}'
    with pytest.raises(CacheMismatch, match="other settings"):
        evaluate([tmp_path / "m/seed-0/best.pt"], other, n_way=2, q_query=5, episodes=5, runs=1)


def test_a_format_1_checkpoint_loads_as_it_was_trained(tmp_path):
    from pipeline.fewshot import checkpoint
    torch.manual_seed(0)
    head = heads.build("lstm", {"hidden": 8}, 768).eval()
    old = dict(head="lstm", head_config={"hidden": 8}, state_dict=head.state_dict(), episode=250, best_val=0.5,
               train_config=dict(head="lstm", hidden=8, loss="circle", k_shot=1, seed=0),
               cache=dict(path="c.h5", settings={}, settings_hash="x", provenance={}))
    torch.save(old, tmp_path / "old.pt")
    ck = checkpoint.load(tmp_path / "old.pt")
    assert ck.format == 1 and ck.head_options == {"hidden": 8} and "hidden" not in ck.train_config
    x = torch.randn(3, 3, 768)
    assert torch.equal(ck.build_head().encode(x), head.encode(x))
    assert "(format 1)" in checkpoint.describe(tmp_path / "old.pt", ck)


def test_seeds_of_one_run_equal_separate_runs_and_share_validation_episodes(cache, tmp_path):
    cfg = dict(head="lstm", head_options={"hidden": 16}, episodes=100, **FAST)
    r = train(cache, tmp_path / "two", TrainConfig(seed=3, seeds=2, **cfg), progress=False)
    assert [x["seed"] for x in r] == [3, 4]
    train(cache, tmp_path / "alone", TrainConfig(seed=4, **cfg), progress=False)
    a = torch.load(tmp_path / "two/seed-4/last.pt", weights_only=False)
    b = torch.load(tmp_path / "alone/seed-4/last.pt", weights_only=False)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["train_config"]["seed"] == 4 and a["train_config"]["seeds"] == 1
    res, accs = evaluate([tmp_path / "two"], cache, n_way=2, q_query=5, episodes=20, runs=2)
    assert accs[0].shape == (2, 40) and [s["seed"] for s in res[0]["per_seed"]] == [3, 4]
    assert res[0]["accuracy"] == pytest.approx(accs[0].mean()) and "last_test" in res[0]["per_seed"][0]
    val_files = list((cache.parent / "order.episodes").glob("val-*seed4-*.npz"))
    assert val_files, "both seeds validate on the episodes of seed 3 + 1"


def test_per_video_circle_loss_trains_k_shot(cache, tmp_path):
    from pipeline.fewshot.train import episode_scores
    from pipeline.fewshot.features import load
    from pipeline.store import FeatureStore
    head = heads.build("lstm", {"hidden": 8}, 768)
    with FeatureStore(cache) as st:
        feats = load(st, "train", "pooled")
    episode = np.stack([feats.by_class()[c][:4] for c in sorted(feats.by_class())[:3]])   # 3-way 2-shot 2 queries
    per_video, target = episode_scores(head, feats, episode, 2, per_video=True)
    classes, _ = episode_scores(head, feats, episode, 2)
    assert per_video.shape == (6, 3, 2) and classes.shape == (6, 3) and target.tolist() == [0, 0, 1, 1, 2, 2]
    cfg = TrainConfig(head="lstm", head_options={"hidden": 16}, loss="circle_per_video", episodes=60,
                      **dict(FAST, k_shot=2))
    assert 0 <= train(cache, tmp_path / "pv", cfg, progress=False)[0]["best_val"] <= 1


def test_train_views_random_draws_only_the_random_crops(tmp_path, monkeypatch):
    import numpy as np
    from cachegen import write_cache
    from pipeline.errors import ConfigError
    from pipeline.fewshot.features import SplitFeatures
    rng = np.random.default_rng(0)
    data = {f"c{i}": rng.normal(size=(6, 3, 768)).astype(np.float32) for i in range(6)}
    parts = {c: ("train", "train", "val", "val", "test", "test")[i] for i, c in enumerate(data)}
    three = write_cache(tmp_path / "v3.h5", data, parts, views=3)
    drawn, real = [], SplitFeatures.inputs

    def spy(self, videos, views=None, clips=None, rng=None, sampler="segments"):
        if rng is not None:                                   # training draws only
            drawn.append(np.asarray(views))
        return real(self, videos, views, clips, rng, sampler)
    monkeypatch.setattr(SplitFeatures, "inputs", spy)
    fast = dict(head="lstm", head_options={"hidden": 8}, n_way=2, episodes=60, val_every=60, val_episodes=5, val_query=2)
    for mode, lowest in (("all", 0), ("random", 1)):
        drawn.clear()
        train(three, tmp_path / mode, TrainConfig(train_views=mode, **fast), progress=False)
        views = np.concatenate(drawn)
        assert views.min() == lowest and views.max() == 2 and len(views) == 60 * 4
    one = write_cache(tmp_path / "v1.h5", data, parts)
    with pytest.raises(ConfigError, match="centre crop only"):
        train(one, tmp_path / "none", TrainConfig(train_views="random", **fast), progress=False)
    assert not (tmp_path / "none").exists()


def test_a_format_2_chamfer_checkpoint_loads_as_it_was_trained(tmp_path):
    """Format 2's chamfer (consecutive tuples, `proj`/`norm`, a learnt log-scale) is rebuilt as the
    study's head with those settings; its scores differ only by the study's cosine epsilon (0.01)."""
    import math

    import torch.nn.functional as F

    from pipeline.fewshot import checkpoint
    g = torch.Generator().manual_seed(0)
    state = {"proj.weight": 0.05 * torch.randn(16, 2 * 768, generator=g), "proj.bias": torch.randn(16, generator=g),
             "norm.weight": 1 + 0.1 * torch.randn(16, generator=g), "norm.bias": 0.1 * torch.randn(16, generator=g),
             "log_scale": torch.tensor(math.log(7.0))}
    opts = dict(clips=3, per_step=False, tuple_length=2, dim=16, scale=1.0, learn_scale=True)
    old = dict(format=2, head="chamfer", head_options=opts, state_dict=state, episode=250, best_val=0.5, resume=None,
               train_config=dict(head="chamfer", head_options=opts, loss="circle", k_shot=1, seed=0),
               cache=dict(path="c.h5", settings={}, settings_hash="x", provenance={}))
    torch.save(old, tmp_path / "old.pt")
    ck = checkpoint.load(tmp_path / "old.pt")
    assert ck.head_options["tuples"] == "consecutive" and ck.head_options["projection"] == 16

    def old_scores(support, queries):   # format 2's ChamferMatcher, written out
        def enc(x):
            t = torch.stack([torch.cat([v[i], v[i + 1]]) for v in x for i in range(2)]).view(len(x), 2, -1)
            return F.normalize(F.layer_norm(t @ state["proj.weight"].T + state["proj.bias"], (16,),
                                            state["norm.weight"], state["norm.bias"]), dim=-1)
        s, q = enc(support.flatten(0, 1)).unflatten(0, support.shape[:2]).flatten(1, 2), enc(queries)
        sims = torch.einsum("mud,nvd->mnuv", q, s)
        return 7.0 * 0.5 * (sims.amax(-1).mean(-1) + sims.amax(-2).mean(-1))

    support, queries = torch.randn(3, 2, 3, 768, generator=g), torch.randn(4, 3, 768, generator=g)
    with torch.no_grad():
        assert torch.allclose(ck.build_head()(support, queries), old_scores(support, queries), rtol=2e-3, atol=0)
