"""Damaged feature values never become scores: NaN rows and damaged bytes are refused, naming what."""
import h5py
import numpy as np
import pytest

from cachegen import order_cache
from pipeline.fewshot.evaluate import evaluate
from pipeline.fewshot.features import FeatureError
from pipeline.fewshot.train import TrainConfig, train
from pipeline.store import FeatureStore

FAST = dict(n_way=2, k_shot=1, q_query=2, val_every=50, val_episodes=10, val_query=5, episodes=50)


def first_row_of(cache, part):
    with FeatureStore(cache) as st:
        i = int(np.flatnonzero(st.videos["part"] == part)[3])
        return st.videos["id"][i], int(st.videos["first_row"][i])


@pytest.mark.parametrize("part,dataset", [("test", "pooled"), ("val", "pooled"), ("train", "steps")])
def test_a_nan_in_one_videos_features_is_refused_naming_it(tmp_path, part, dataset):
    cache = order_cache(tmp_path / "c.h5")
    vid, row = first_row_of(cache, part)
    with h5py.File(cache, "r+") as f:
        f[dataset][(row + 1, 7) if dataset == "pooled" else (row + 1, 0, 7)] = np.nan
    opts = {"per_step": True} if dataset == "steps" else {}
    cfg = TrainConfig(head="otam" if opts else "lstm", head_options=dict(clips=3, **opts), **FAST)
    with pytest.raises(FeatureError, match=f"non-finite values in the {dataset} features of 1 video.*{vid}"):
        train(cache, tmp_path / "run", cfg, progress=False)
        evaluate([tmp_path / "run"], cache, n_way=2, q_query=5, episodes=10, runs=1)


def test_damaged_bytes_in_the_pooled_vectors_are_an_error_not_a_number(tmp_path):
    cache = order_cache(tmp_path / "c.h5")
    train(cache, tmp_path / "run", TrainConfig(head="mean", **FAST), progress=False)
    with h5py.File(cache) as f:
        info = f["pooled"].id.get_chunk_info(0)        # rows 0-255 (train videos come first)
    with open(cache, "r+b") as raw:
        raw.seek(info.byte_offset + 1000)
        raw.write(np.random.default_rng(0).bytes(64))
    with pytest.raises(FeatureError, match=r"rows 0-\d+ of /pooled cannot be read .*damaged"):
        train(cache, tmp_path / "again", TrainConfig(head="mean", **FAST), progress=False)


def test_merging_caches_of_different_video_lists_names_both_videos(tmp_path):
    from cachegen import write_cache
    from pipeline.store import CacheMismatch, merge
    x = np.zeros((2, 3, 768), np.float32)
    a = write_cache(tmp_path / "a.h5", {"walk": x}, {"walk": "train"})
    b = write_cache(tmp_path / "b.h5", {"run": x}, {"run": "train"})         # other videos, same order numbers
    with pytest.raises(CacheMismatch, match=r"video number 0 is walk/walk_0 in .*a.h5 but run/run_0 in .*b.h5: "
                                            r"the files were cut from different video lists"):
        merge([a, b], tmp_path / "m.h5")
    with pytest.raises(CacheMismatch, match=r"video walk/walk_0 is in both"):
        merge([a, a], tmp_path / "m.h5")


def test_a_head_that_scores_nan_is_refused_naming_the_episode(tmp_path):
    from dataclasses import replace

    from pipeline.fewshot import checkpoint
    from pipeline.fewshot.evaluate import ScoreError
    cache = order_cache(tmp_path / "c.h5")
    train(cache, tmp_path / "run", TrainConfig(head="lstm", head_options=dict(clips=3, hidden=8), **FAST), progress=False)
    path = tmp_path / "run/seed-0/best.pt"
    ck = checkpoint.load(path)
    state = {k: v.clone() for k, v in ck.state_dict.items()}
    next(iter(state.values()))[0] = float("nan")          # a damaged weight, finite features
    checkpoint.save(path, replace(ck, state_dict=state))
    with pytest.raises(ScoreError, match=r"non-finite scores for episode 0 of 10 and 9 more"):
        evaluate([path], cache, n_way=2, q_query=5, episodes=10, runs=1)


def test_drop_nonfinite_leaves_the_damaged_videos_out_and_records_them(tmp_path):
    from pipeline.fewshot import checkpoint
    cache = order_cache(tmp_path / "c.h5")
    bad = {}
    for part in ("train", "test"):
        vid, row = first_row_of(cache, part)
        bad[part] = vid
        with h5py.File(cache, "r+") as f:
            f["pooled"][row, 3] = np.inf
    cfg = TrainConfig(head="lstm", head_options=dict(clips=3, hidden=8), **FAST)
    logged = []
    train(cache, tmp_path / "run", cfg, progress=False, drop_nonfinite=True, log=logged.append)
    assert checkpoint.load(tmp_path / "run/seed-0/best.pt").cache["dropped"] == {"train": [bad["train"]]}
    assert any(bad["train"] in line and "left out of train" in line for line in logged)
    results, _ = evaluate([tmp_path / "run"], cache, n_way=2, q_query=5, episodes=10, runs=1, drop_nonfinite=True)
    assert results[0]["dropped"] == [bad["test"]]
    from pipeline.fewshot.evaluate import dropped_note
    assert dropped_note(results) == (f"run: 1 test video(s) left out for non-finite features (--drop-nonfinite: "
                                     f"{bad['test']}); its episodes were drawn without them")


def test_a_cache_replaced_under_the_same_name_gets_fresh_episodes(tmp_path):
    cache = order_cache(tmp_path / "c.h5")
    train(cache, tmp_path / "run", TrainConfig(head="mean", head_options=dict(clips=3), **FAST), progress=False)
    first, _ = evaluate([tmp_path / "run"], cache, n_way=2, q_query=5, episodes=10, runs=1)
    order_cache(cache, videos=18)                          # same name and settings, other videos
    again, _ = evaluate([tmp_path / "run"], cache, n_way=2, q_query=5, episodes=10, runs=1)
    assert first[0]["episodes_digest"] != again[0]["episodes_digest"]
    assert len(list((tmp_path / "c.episodes").glob("test-*.npz"))) == 2     # the old file is not reused


def _drop_map_checksums(src, dst):
    """A copy of a cache as written before the maps carried fletcher32 checksums."""
    import shutil
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        maps = f["features"][:]
        del f["features"]
        f.create_dataset("features", data=maps, maxshape=(None, *maps.shape[1:]), chunks=(1, *maps.shape[1:]))
    return dst


def test_a_changed_byte_in_a_map_is_an_error_not_another_number(tmp_path):
    from pipeline.store import filters
    cache = order_cache(tmp_path / "c.h5")                 # compression none: any changed byte is a valid float
    cfg = TrainConfig(head="rvn1", **FAST)
    train(cache, tmp_path / "run", cfg, progress=False)
    with h5py.File(cache) as f:
        assert f["features"].fletcher32 and len(filters(f["features"])) == 1
        info = f["features"].id.get_chunk_info(0)
    with open(cache, "r+b") as raw:
        raw.seek(info.byte_offset + 100)
        byte = raw.read(1)
        raw.seek(info.byte_offset + 100)
        raw.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(FeatureError, match=r"rows 0-\d+ of /features cannot be read .*damaged"):
        train(cache, tmp_path / "again", cfg, progress=False)


def test_a_cache_without_map_checksums_loads_and_merges_into_a_checksummed_one(tmp_path):
    from pipeline.store import merge, verify
    from pipeline.tools.info import describe
    old = _drop_map_checksums(order_cache(tmp_path / "c.h5"), tmp_path / "old.h5")
    assert "no checksums on the maps" in describe(old)
    assert verify(old, progress=False)[1] == []
    merge([old], tmp_path / "m.h5")
    with FeatureStore(old) as a, FeatureStore(tmp_path / "m.h5") as b:
        assert b.f["features"].fletcher32 and not a.f["features"].fletcher32
        assert np.array_equal(a.f["features"][:], b.f["features"][:])
        assert list(a.videos["digest"]) == list(b.videos["digest"])
        assert a.f.attrs["content_digest"] == b.f.attrs["content_digest"]
    assert verify(tmp_path / "m.h5", progress=False)[1] == []
    train(old, tmp_path / "run", TrainConfig(head="rvn1", **FAST), progress=False)
