import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import write_video
from pipeline.extraction.datasets import load_split, resolve
from pipeline.extraction.backbone import Backbone
from pipeline.extraction.extractor import extract_features, parse_shard
from pipeline.extraction.settings import ExtractSettings
from pipeline.store import CacheMismatch, FeatureStore
from pipeline.extraction.video import Preprocess, Sampling

SMALL = ["--clips", "2", "--frames", "4", "--resize", "40", "--crop", "32", "--part-size", "2", "--workers", "0",
         "--batch-size", "3"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """5 classes (3/1/1) x 3 videos of 20-40 frames, one of them truncated to garbage."""
    root = tmp_path_factory.mktemp("data")
    classes = ["a", "b", "c", "d", "e"]
    for ci, c in enumerate(classes):
        for i in range(3):
            write_video(root / c / f"{c}_{i}.avi", 20 + 7 * i + ci)
    (root / "c" / "c_2.avi").write_bytes(b"\x00" * 1000)  # corrupt
    split = root.parent / (root.name + "_split")
    split.mkdir()
    for part, cs in (("train", "abc"), ("val", "d"), ("test", "e")):
        (split / f"{part}_classes.txt").write_text("\n".join(cs) + "\n")
    return root, split


def run_cli(dataset, out, *extra):
    root, split = dataset
    cmd = [sys.executable, "-m", "pipeline", "extract", "--root", str(root), "--split", str(split), "--out", str(out),
           *SMALL, *extra]
    return subprocess.run(cmd, capture_output=True, text=True)


def table(path):
    with FeatureStore(path) as s:
        return ({k: list(v) for k, v in s.videos.items()}, s.f["features"][:], s.f["pooled"][:],
                s.f["clips/frame_indices"][:], s.f["steps"][:], s.settings)


def test_extract_writes_the_documented_format_and_records_failures(dataset, tmp_path):
    r = run_cli(dataset, tmp_path / "c.h5", "--views", "2")
    assert r.returncode == 0, r.stderr
    assert "1 video(s) failed" in r.stdout and "c/c_2" in r.stdout
    assert "RANDOMLY INITIALISED" in r.stderr
    with h5py.File(tmp_path / "c.h5") as f:
        assert f["features"].shape == (14 * 2 * 2, 768, 2, 1, 1)   # 14 good videos x 2 views x 2 clips
        assert f["features"].dtype == np.float16 and f["features"].chunks == (1, 768, 2, 1, 1)
        assert f["features"].compression == "lzf"
        assert f["pooled"].shape == (56, 768) and f["pooled"].dtype == np.float32
        np.testing.assert_allclose(f["pooled"][5], f["features"][5].astype(np.float32).mean((1, 2, 3)), atol=2e-3)
        assert f["steps"].shape == (56, 2, 768) and f["steps"].dtype == np.float16 and f.attrs["format_version"] == 2
        np.testing.assert_allclose(f["steps"][5], f["features"][5].astype(np.float32).mean((2, 3)).T, atol=2e-3)
        assert f["clips/view"][:4].tolist() == [0, 0, 1, 1] and f["clips/clip"][:4].tolist() == [0, 1, 0, 1]
    with FeatureStore(tmp_path / "c.h5") as s:
        assert len(s) == 15 and s.failures()[0][0] == "c/c_2"
        i = list(s.videos["id"]).index("c/c_2")
        assert s.videos["n_clips"][i] == 0 and "not a readable video" in s.videos["reason"][i]
        assert s.settings["sampling"] == {"mode": "segments", "clips": 2, "frames": 4, "step": 1, "stride": None}
        assert s.provenance["weights_sha256"] == "random" and s.provenance["split"].endswith("_split")
        assert s.videos["part"][-1] == "test" and s.videos["label"][-1] == 4
        # frame indices are stored per clip and follow the segments rule for the real frame count
        a0 = list(s.videos["id"]).index("a/a_0")
        rows = s.rows(a0, view=0)
        n = s.videos["n_frames"][a0]
        assert n == 20
        assert s.f["clips/frame_indices"][rows].tolist() == Sampling(clips=2, frames=4).indices(n).tolist()


def test_rerun_is_a_no_op_and_other_settings_are_refused(dataset, tmp_path):
    assert run_cli(dataset, tmp_path / "c.h5").returncode == 0
    again = run_cli(dataset, tmp_path / "c.h5")
    assert again.returncode == 0 and "up to date" in again.stdout
    other = run_cli(dataset, tmp_path / "c.h5", "--dtype", "float32")
    assert other.returncode == 2 and "other settings" in other.stderr and "dtype" in other.stderr
    assert run_cli(dataset, tmp_path / "c.h5", "--dtype", "float32", "--overwrite").returncode == 0
    with h5py.File(tmp_path / "c.h5") as f:
        assert f["features"].dtype == np.float32


def test_same_settings_from_other_videos_or_part_size_are_refused_not_reused(dataset, tmp_path):
    root, split = dataset
    assert run_cli(dataset, tmp_path / "c.h5").returncode == 0
    moved = tmp_path / "split2"
    moved.mkdir()
    for part, cs in (("train", "ab"), ("val", "cd"), ("test", "e")):          # c moves from train to val
        (moved / f"{part}_classes.txt").write_text("\n".join(cs) + "\n")
    cmd = [sys.executable, "-m", "pipeline", "extract", "--root", str(root), "--split", str(moved), "--out",
           str(tmp_path / "c.h5"), *SMALL]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "same settings from other videos" in r.stderr and "--overwrite" in r.stderr
    r = subprocess.run([*cmd, "--overwrite"], capture_output=True, text=True)
    assert r.returncode == 0 and "up to date" not in r.stdout
    with FeatureStore(tmp_path / "c.h5") as st:
        assert sorted(set(st.videos["part"][st.videos["class_name"] == "c"])) == ["val"]
    assert "up to date" in subprocess.run([*cmd, "--overwrite"], capture_output=True, text=True).stdout
    parts = tmp_path / "p.h5.parts"
    parts.mkdir()
    (parts / "settings.json").write_text('{"part_size": 7}')
    r = run_cli(dataset, tmp_path / "p.h5")
    assert r.returncode == 2 and "not a feature cache" in r.stderr


def test_the_same_extraction_gives_the_same_values_and_the_same_summary_bytes(dataset, tmp_path):
    for name in ("a.h5", "b.h5"):
        assert run_cli(dataset, tmp_path / name, "--summary", str(tmp_path / f"{name}.json")).returncode == 0
    # lzf's compressed bytes may differ (its hash table starts from uninitialised memory); values may not
    assert differences(tmp_path / "a.h5", tmp_path / "b.h5") == []
    a, b = ((tmp_path / f"{n}.json").read_bytes() for n in ("a.h5", "b.h5"))
    assert a == b and json.loads(a)["videos"] == 15 and json.loads(a)["failed"] == 1


def differences(a, b) -> list[str]:
    """The attributes and datasets of two cache files whose values differ."""
    out = []
    with h5py.File(a) as fa, h5py.File(b) as fb:
        out += [f"attr {k}" for k in set(fa.attrs) | set(fb.attrs) if fa.attrs.get(k) != fb.attrs.get(k)]
        fa.visititems(lambda name, obj: out.append(f"dataset {name}") if isinstance(obj, h5py.Dataset)
                      and not np.array_equal(obj[()], fb[name][()]) else None)
    return out


def test_kill_9_then_resume_gives_the_same_cache(dataset, tmp_path):
    assert run_cli(dataset, tmp_path / "full.h5").returncode == 0
    root, split = dataset
    out = tmp_path / "killed.h5"
    cmd = [sys.executable, "-m", "pipeline", "extract", "--root", str(root), "--split", str(split), "--out", str(out),
           *SMALL]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "killed.h5.parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("part-*.h5"))) < 2:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not out.exists()  # no half-written cache in place of a good one
    done = len(list(parts.glob("part-*.h5")))
    assert 2 <= done < 8
    r = run_cli(dataset, out)
    assert r.returncode == 0 and "resumed" in r.stdout
    a, b = table(tmp_path / "full.h5"), table(out)
    assert a[0] == b[0]
    for x, y in zip(a[1:5], b[1:5]):
        assert np.array_equal(x, y)
    assert not parts.exists()


def test_two_shards_merge_into_the_single_process_cache(dataset, tmp_path):
    assert run_cli(dataset, tmp_path / "one.h5").returncode == 0
    for i in range(2):
        r = run_cli(dataset, tmp_path / "s.h5", "--shard", f"{i}/2")
        assert r.returncode == 0, r.stderr
    shards = [tmp_path / f"s.shard-{i}-of-2.h5" for i in range(2)]
    with FeatureStore(shards[0]) as s0, FeatureStore(shards[1]) as s1:
        assert set(s0.videos["id"]).isdisjoint(s1.videos["id"]) and len(s0) + len(s1) == 15
    r = subprocess.run([sys.executable, "-m", "pipeline", "merge", *map(str, shards), "--out", str(tmp_path / "m.h5")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = table(tmp_path / "one.h5"), table(tmp_path / "m.h5")
    assert a[0] == b[0]
    for x, y in zip(a[1:5], b[1:5]):
        assert np.array_equal(x, y)
    dup = subprocess.run([sys.executable, "-m", "pipeline", "merge", str(shards[0]), str(shards[0]), "--out",
                          str(tmp_path / "d.h5")], capture_output=True, text=True)
    assert dup.returncode == 2 and "is in both" in dup.stderr


def test_shard_from_environment(monkeypatch):
    assert parse_shard("1/4") == (1, 4)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard(None) == (2, 3)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert parse_shard(None) == (1, 2)
    with pytest.raises(ValueError, match="i/N"):
        parse_shard("3")


def test_dense_sampling_and_library_call(dataset, tmp_path):
    root, split = dataset
    entries, _ = resolve(load_split(split), root)
    backbone = Backbone.load(None, 0)
    s = ExtractSettings(Sampling("dense", frames=4, step=2), Preprocess(resize=40, crop=32))
    summary = extract_features(entries[:2], tmp_path / "d.h5", s, backbone, workers=0, progress=False)
    with FeatureStore(tmp_path / "d.h5") as st:
        # a_0 has 20 frames: windows of span 7 every 8 frames -> starts 0, 8, then 13 flush with the end
        assert st.videos["n_clips"][0] == 3
        assert st.f["clips/frame_indices"][:3, 0].tolist() == [0, 8, 13]
    assert summary["videos"] == 2
    with pytest.raises(CacheMismatch):
        extract_features(entries[:2], tmp_path / "d.h5", ExtractSettings(Sampling("dense", frames=4, step=1),
                                                                         Preprocess(resize=40, crop=32)), backbone,
                         workers=0, progress=False)


def test_half_precision_is_flagged_where_the_cpu_would_emulate_it(tmp_path):
    from pipeline.device import slow_half_precision
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\n")
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert slow_half_precision("bf16", str(avx2)) and slow_half_precision("fp16", str(avx2))
    assert not slow_half_precision("bf16", str(amx)) and slow_half_precision("fp16", str(amx))
    assert not slow_half_precision("fp32", str(avx2)) and not slow_half_precision("bf16", str(tmp_path / "none"))
