"""The per-time-step view: what it holds, the upgrade of older caches, and heads that read it."""
import h5py
import numpy as np
import pytest

from pipeline import store
from pipeline.fewshot import heads
from pipeline.fewshot.evaluate import evaluate
from pipeline.fewshot.features import load
from pipeline.fewshot.train import TrainConfig, train
from pipeline.store import CacheError, FeatureStore, StoreWriter, VideoResult, step_maps

SETTINGS = dict(backbone="MFNet3D", dtype="float32", compression="lzf", note="synthetic")


def within_clip_order_cache(path, videos=12, noise=0.2, seed=0):
    """One clip per video whose 4 temporal positions run a -> b (class *_fwd) or b -> a (*_rev): the
    clip means of a pair are equal, so only the per-step view can tell the classes apart."""
    rng = np.random.default_rng(seed)
    w = StoreWriter(path, SETTINGS, {}, (768, 4, 2, 2), frames=2)
    order = 0
    for p in range(4):
        a, b = rng.normal(size=(2, 768))
        for name, seq in ((f"p{p}_fwd", (a, a, b, b)), (f"p{p}_rev", (b, b, a, a))):
            part = "test" if p == 3 else "val" if p == 2 else "train"
            for i in range(videos):
                steps = np.stack(seq) + noise * rng.normal(size=(4, 768))                  # (t, C)
                maps = np.broadcast_to(steps.T[None, :, :, None, None], (1, 768, 4, 2, 2)).astype(np.float32)
                w.add(VideoResult(f"{name}/{name}_{i}", name, part, 2 * p + (name[-3:] == "rev"), order, maps=maps,
                                  pooled=store.pool_maps(maps), frame_indices=np.zeros((1, 2), np.int32),
                                  n_views=1, n_frames=10))
                order += 1
    w.close()
    return path


def to_format_1(src, dst):
    """A copy of `src` as the first format wrote it: no /steps."""
    with h5py.File(src) as a, h5py.File(dst, "w") as b:
        for name in a:
            if name != "steps":
                a.copy(a[name], b, name)
        b.attrs.update(dict(a.attrs))
        b.attrs["format_version"] = 1
    return dst


def test_step_maps_pool_over_space_only():
    maps = np.arange(2 * 3 * 2 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2, 2)   # (n, C, t, h, w)
    s = step_maps(maps)
    assert s.shape == (2, 2, 3) and s.dtype == np.float16
    # clip 0, step 1, channel 0: positions 4..7 of channel 0 -> mean 5.5; clip 1, step 0, channel 2: 40..43 -> 41.5
    assert s[0, 1, 0] == 5.5 and s[1, 0, 2] == 41.5


def test_steps_sequences_put_each_clips_positions_in_a_row(tmp_path):
    cache = within_clip_order_cache(tmp_path / "c.h5")
    with FeatureStore(cache) as st:
        f = load(st, "test", "steps")
        maps = st.f["features"][st.rows(int(np.flatnonzero(st.videos["part"] == "test")[0]))]
    assert f.x.shape == (24, 4, 768) and f.x.dtype == np.float16
    seq = f.inputs([0], clips=3)                       # one clip repeated three times, its 4 steps each
    assert seq.shape == (1, 12, 768)
    np.testing.assert_array_equal(seq[0, :4], step_maps(maps)[0])
    np.testing.assert_array_equal(seq[0, 4:8], seq[0, :4])


def test_upgrade_adds_the_view_resumes_after_an_interruption_and_refuses_nothing_else(tmp_path, monkeypatch):
    new = within_clip_order_cache(tmp_path / "new.h5")
    old = to_format_1(new, tmp_path / "old.h5")
    with FeatureStore(old) as st:
        assert st.version == 1 and len(load(st, "test", "pooled").ids) == 24    # the old format still loads
        with pytest.raises(CacheError, match=f"run `pipeline upgrade {old}`"):
            load(st, "test", "steps")
    real, calls = store.step_maps, []

    def dies_on_third_block(maps):
        calls.append(len(maps))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(maps)
    monkeypatch.setattr(store, "step_maps", dies_on_third_block)
    with pytest.raises(KeyboardInterrupt):
        store.upgrade(old, block=10, progress=False)
    with h5py.File(f"{old}.upgrading") as f:
        assert f.attrs["steps_done"] == 20
    assert FeatureStore(old).version == 1                  # the cache itself untouched until complete
    monkeypatch.setattr(store, "step_maps", real)
    calls.clear()
    monkeypatch.setattr(store, "step_maps", lambda m: calls.append(len(m)) or real(m))
    assert "upgraded to format 2" in store.upgrade(old, block=10, progress=False)
    assert sum(calls) == 96 - 20                          # resumed: the first two blocks not read again
    with FeatureStore(old) as a, FeatureStore(new) as b:
        assert a.version == 2 and np.array_equal(a.f["steps"][:], b.f["steps"][:])
        assert np.array_equal(a.f["features"][:], b.f["features"][:]) and list(a.videos["id"]) == list(b.videos["id"])
    assert not (tmp_path / "old.h5.upgrading").exists()
    assert "nothing to do" in store.upgrade(old, progress=False)


def test_per_step_view_sees_order_inside_a_clip(tmp_path):
    cache = within_clip_order_cache(tmp_path / "c.h5")
    fast = dict(n_way=2, k_shot=1, q_query=2, val_episodes=20, val_query=5)
    for name, opts in (("otam_steps", {"per_step": True, "clips": 1}), ("otam_clips", {"clips": 1})):
        train(cache, tmp_path / name, TrainConfig(head="otam", head_options=opts, **fast), progress=False)
    res, _ = evaluate([tmp_path / "otam_steps", tmp_path / "otam_clips"], cache, n_way=2, q_query=5, episodes=50,
                      runs=2)
    steps, clips = res
    assert steps["accuracy"] > 0.95 and abs(clips["accuracy"] - 0.5) < 0.15     # chance is 0.5


def test_sequence_lengths_a_head_cannot_use_are_refused():
    import torch
    from pipeline.errors import ConfigError
    with pytest.raises(ConfigError, match="tuple size 3 is larger than the sequence"):
        heads.build("trx", {"clips": 2, "dim": 8}, 768)
    with pytest.raises(ConfigError, match="tuple size 3 is larger than the sequence"):
        heads.build("trx", {"clips": 1, "per_step": True, "dim": 8}, 768).encode(torch.zeros(1, 2, 768))
    with pytest.raises(ConfigError, match="use fewer clips, per_step=false"):
        heads.build("trx", {"clips": 8, "per_step": True, "dim": 8}, 768).encode(torch.zeros(1, 64, 768))
    with pytest.raises(ConfigError, match="tuple_length 3 is longer"):
        heads.build("chamfer", {"clips": 2, "projection": 8}, 768)
    with pytest.raises(ConfigError, match="tuple_length 3 is longer"):
        heads.build("chamfer", {"clips": 1, "per_step": True, "projection": 8}, 768).encode(torch.zeros(1, 2, 768))
    with pytest.raises(ConfigError, match="clips=0 is out of range: clips must satisfy 1 <= x"):
        heads.build("otam", {"clips": 0}, 768)
