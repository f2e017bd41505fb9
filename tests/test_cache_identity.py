"""A cache is its settings and the videos' files: a changed dataset is never resumed into, called up to
date or mixed in; stored values are checked against digests written with them."""
import shutil

import h5py
import numpy as np
import pytest

from conftest import cli, write_video
from pipeline.extraction import extractor
from pipeline.extraction.backbone import Backbone
from pipeline.extraction.datasets import load_split, resolve
from pipeline.extraction.extractor import describe_change, extract_features
from pipeline.extraction.settings import ExtractSettings
from pipeline.extraction.video import Preprocess, Sampling
from pipeline.store import CacheMismatch, FeatureStore, verify

SETTINGS = ExtractSettings(Sampling(clips=2, frames=4), Preprocess(resize=40, crop=32))


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    for ci, c in enumerate("abcd"):
        for i in range(3):
            write_video(root / c / f"{c}_{i}.avi", 20 + 5 * i + ci)
    split = tmp_path / "split"
    split.mkdir()
    for part, cs in (("train", "ab"), ("val", "c"), ("test", "d")):
        (split / f"{part}_classes.txt").write_text("\n".join(cs) + "\n")
    return root, split


def extract(data, out, **kw):
    root, split = data
    entries, _ = resolve(load_split(split), root)
    return extract_features(entries, out, SETTINGS, Backbone.load(None, 0), batch_size=3, workers=0,
                            progress=False, **dict(dict(part_size=2), **kw))


def interrupted(data, out, monkeypatch, after=1):
    """An extraction stopped (as by Ctrl-C) after `after` part files were written."""
    real, calls = extractor._forward_part, []

    def stop(*a):
        if len(calls) == after:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a)
    monkeypatch.setattr(extractor, "_forward_part", stop)
    with pytest.raises(KeyboardInterrupt):
        extract(data, out)
    monkeypatch.setattr(extractor, "_forward_part", real)


@pytest.mark.filterwarnings("ignore:no --weights")
def test_resume_after_a_video_was_added_is_refused_naming_it_then_every_video_is_there_once(data, tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    interrupted(data, out, monkeypatch)
    assert len(list((tmp_path / "c.h5.parts").glob("part-*.h5"))) == 1
    write_video(data[0] / "a" / "a_new.avi", 30)
    with pytest.raises(CacheMismatch, match=r"other videos or files \(1 added \(a/a_new\)\).*--overwrite"):
        extract(data, out)
    assert extract(data, out, overwrite=True)["status"] == "written"
    with FeatureStore(out) as st:
        ids = list(st.videos["id"])
    assert len(ids) == len(set(ids)) == 13 and "a/a_new" in ids


@pytest.mark.filterwarnings("ignore:no --weights")
def test_resume_with_another_part_size_says_which_to_use(data, tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    interrupted(data, out, monkeypatch)
    with pytest.raises(CacheMismatch, match="cut into parts of 2 videos, not 3: resume with --part-size 2"):
        extract(data, out, part_size=3)
    assert extract(data, out, part_size=2)["resumed_parts"] == 1


@pytest.mark.filterwarnings("ignore:no --weights")
def test_a_damaged_part_file_is_named_and_computed_again(data, tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    interrupted(data, out, monkeypatch, after=2)
    damaged = tmp_path / "c.h5.parts" / "part-000001.h5"
    damaged.write_bytes(damaged.read_bytes()[:300])                   # cut short, as by a disk fault
    with pytest.warns(UserWarning, match=r"part-000001.h5 is damaged \(feature cache .*not a readable HDF5 file"):
        r = extract(data, out)
    assert r["resumed_parts"] == 1 and r["videos"] == 12
    extract(data, tmp_path / "whole.h5")
    with FeatureStore(out) as a, FeatureStore(tmp_path / "whole.h5") as b:
        assert a.f.attrs["content_digest"] == b.f.attrs["content_digest"]


@pytest.mark.filterwarnings("ignore:no --weights")
def test_a_modified_file_is_not_up_to_date_and_an_unchanged_dataset_is(data, tmp_path):
    out = tmp_path / "c.h5"
    extract(data, out)
    assert extract(data, out)["status"] == "up to date"
    with h5py.File(tmp_path / "old.h5", "w") as f, h5py.File(out) as src:    # as written before file digests
        for name in src:
            src.copy(src[name], f, name)
        f.attrs.update(dict(src.attrs))
        del f["videos/file_sha256"]
    old = extract(data, tmp_path / "old.h5")
    assert old["status"] == "up to date" and not old["files_compared"]
    write_video(data[0] / "b" / "b_1.avi", 33, size=(60, 40))          # same name, other bytes
    with pytest.raises(CacheMismatch, match=r"1 modified \(b/b_1\)"):
        extract(data, out)
    other = tmp_path / "copy"                                          # same ids under another root: up to date
    shutil.copytree(data[0], other)
    assert extract((other, data[1]), tmp_path / "d.h5")["status"] == "written"
    assert extract((other, data[1]), tmp_path / "d.h5")["status"] == "up to date"


def test_describe_change_lists_added_removed_modified_and_moved():
    have = [["a/1", "train", 0, "x"], ["a/2", "train", 0, "y"], ["b/1", "val", 1, "z"]]
    assert describe_change(have, have) == ""
    want = [["a/1", "train", 0, "x"], ["a/2", "train", 0, "Y"], ["b/1", "test", 1, "z"], ["b/9", "test", 1, "w"]]
    assert describe_change(have, want) == "1 added (b/9); 1 modified (a/2); 1 in another part or class (b/1)"
    old = [h[:3] + [""] for h in have]                                  # a cache written before file digests
    assert describe_change(old, [w[:3] + ["new"] for w in have]) == ""


def test_a_clip_whose_maps_are_not_finite_is_recorded_as_failed(tmp_path):
    from tqdm import tqdm

    from pipeline.extraction.datasets import VideoEntry
    from pipeline.extraction.video import VideoClips
    from pipeline.extraction.workers import maps_of

    class Forward:                            # the third video overflows float16
        def submit(self, pieces, out):
            batch = np.concatenate(pieces)
            out[...] = 1
            out[batch[:, 0, 0, 0, 0] == 2] = 1e6

    group, decoded = [], []
    for k in range(3):
        clips = np.full((1, 2, 4, 8, 8, 3), k, np.uint8)
        group.append((VideoEntry(f"a/{k}", write_video(tmp_path / f"{k}.avi", 3), "a", "train", 0), k, "sha"))
        decoded.append((VideoClips(clips, np.zeros((2, 4), np.int64), 10, 10, 25.0, (8, 8)), ""))
    maps = np.empty((extractor.decoded_rows(decoded), 768, 1, 1, 1), np.float32)
    results, spans = extractor._forward_part(group, decoded, Forward(), 4, tqdm(disable=True), maps)
    assert spans == [(0, 2), (2, 2), (4, 2)]
    results = extractor._finish_part(results, maps_of(maps, spans), "float16")
    assert [r.status for r in results] == ["ok", "ok", "failed"]
    assert results[2].maps is None and "non-finite values (NaN or inf in float16) for clip row(s) [0, 1]" in \
        results[2].reason


@pytest.mark.filterwarnings("ignore:no --weights")
def test_verify_names_a_video_whose_values_changed_or_whose_bytes_are_damaged(data, tmp_path):
    out = tmp_path / "c.h5"
    extract(data, out)
    checked, problems = verify(out, progress=False)
    assert checked == 12 and problems == []
    r = cli("info", str(out), "--verify")
    assert r.returncode == 0 and "verified: the stored values of 12 videos equal those written" in r.stdout
    with FeatureStore(out) as st:
        i = list(st.videos["id"]).index("c/c_1")
        row = int(st.videos["first_row"][i])
    with h5py.File(out, "r+") as f:
        f["features"][row + 1] = f["features"][row + 1] + np.float16(0.5)   # valid bytes, other values
    _, problems = verify(out, progress=False)
    assert problems == [f"c/c_1: stored values differ from those written (rows {row}-{row + 1})"]
    with h5py.File(out) as f:
        info = f["features"].id.get_chunk_info(0)
    with open(out, "r+b") as raw:                                        # damaged lzf bytes of the first row
        raw.seek(info.byte_offset)
        raw.write(b"\xff" * info.size)
    r = cli("info", str(out), "--verify")
    assert r.returncode == 2 and "a/a_0: rows 0-1 cannot be read" in r.stderr and "2 problem(s)" in r.stderr


def test_merge_refuses_a_part_that_holds_another_video_under_a_number(tmp_path):
    from cachegen import write_cache
    from pipeline.store import merge
    a = write_cache(tmp_path / "a.h5", {"walk": np.zeros((2, 3, 768), np.float32)}, {"walk": "train"})
    with pytest.raises(CacheMismatch, match=r"holds walk/walk_1 as video number 1, but this extraction's video 1 "
                                            r"is walk/walk_9"):
        merge([a], tmp_path / "m.h5", expect={0: "walk/walk_0", 1: "walk/walk_9"})


def test_an_unreadable_file_gets_no_digest_and_is_left_to_decoding_to_record(tmp_path, monkeypatch):
    good = write_video(tmp_path / "a.avi", 5)

    def sha256(p):
        if p.name == "b.avi":
            raise PermissionError(13, "Permission denied")
        return "x"
    monkeypatch.setattr(extractor, "sha256", sha256)
    for workers in (0, 2):
        assert extractor.file_digests([good, tmp_path / "b.avi"], workers) == ["x", ""]


@pytest.mark.filterwarnings("ignore:no --weights")
def test_a_truncated_file_is_used_with_a_warning_recorded_and_shown(data, tmp_path):
    from pipeline.extraction.video import truncation
    f = data[0] / "a" / "a_2.avi"
    full = f.read_bytes()
    assert truncation(f) == ""
    f.write_bytes(full[:int(len(full) * 0.8)])                       # cut, as by an interrupted download
    extract(data, tmp_path / "c.h5")
    with FeatureStore(tmp_path / "c.h5") as st:
        i = list(st.videos["id"]).index("a/a_2")
        assert st.videos["status"][i] == "ok" and st.videos["warning"][i].startswith(
            f"file truncated: {len(full) * 8 // 10} of the {len(full)} bytes its RIFF header declares")
        assert (st.videos["warning"] != "").sum() == 1
    r = cli("info", str(tmp_path / "c.h5"))
    assert "1 video(s) used with a warning:" in r.stdout and "a/a_2: file truncated" in r.stdout


def test_truncation_walks_mp4_boxes(tmp_path):
    from pipeline.extraction.video import truncation
    box = lambda kind, n: n.to_bytes(4, "big") + kind + bytes(n - 8)          # noqa: E731
    whole = box(b"ftyp", 24) + box(b"mdat", 1000) + box(b"moov", 200)
    (tmp_path / "ok.mp4").write_bytes(whole)
    (tmp_path / "cut.mp4").write_bytes(whole[:900])
    assert truncation(tmp_path / "ok.mp4") == ""
    assert truncation(tmp_path / "cut.mp4").startswith("file truncated: its 'mdat' box at byte 24 declares 1000 "
                                                      "bytes, 876 remain")


@pytest.mark.filterwarnings("ignore:no --weights")
def test_the_size_estimate_of_a_cache_is_its_stored_values(data, tmp_path):
    from dataclasses import replace
    from pipeline.extraction.extractor import estimated_bytes
    settings = replace(SETTINGS, compression="none", preprocess=Preprocess(resize=56, crop=48))   # maps 2x2: 48/32 rounded up
    root, split = data
    entries, _ = resolve(load_split(split), root)
    extract_features(entries, tmp_path / "c.h5", settings, Backbone.load(None, 0), batch_size=3, workers=0,
                     progress=False)
    with h5py.File(tmp_path / "c.h5") as f:
        stored = sum(f[n].size * f[n].dtype.itemsize for n in ("features", "pooled", "steps"))
    assert estimated_bytes(settings, len(entries)) == stored      # every video ok: the estimate is exact


@pytest.mark.filterwarnings("ignore:no --weights")
def test_blosc_stores_the_same_values_as_lzf_and_merges(data, tmp_path):
    from dataclasses import replace
    root, split = data
    entries, _ = resolve(load_split(split), root)
    for comp in ("lzf", "blosc-lz4"):
        extract_features(entries, tmp_path / f"{comp}.h5", replace(SETTINGS, compression=comp), Backbone.load(None, 0),
                         batch_size=3, workers=0, progress=False, part_size=5)     # three parts, merged
    with FeatureStore(tmp_path / "lzf.h5") as a, FeatureStore(tmp_path / "blosc-lz4.h5") as b:
        assert b.settings["compression"] == "blosc-lz4" and b.f["features"].fletcher32
        assert list(a.videos["digest"]) == list(b.videos["digest"])           # the same stored values
        assert np.array_equal(a.f["features"][:], b.f["features"][:])
    assert verify(tmp_path / "blosc-lz4.h5", progress=False)[1] == []
    r = cli("info", str(tmp_path / "blosc-lz4.h5"))
    assert r.returncode == 0 and "compression blosc" in r.stdout


def test_the_stored_cast_and_its_finite_check_are_numpys_bit_for_bit():
    rng = np.random.default_rng(0)
    edges = [65504, 65519.996, 65520, 65536, -65520, -65519.996, np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-8, 6e-8,
             2.9802322e-08, 2.9802326e-08, 1e-45]
    values = np.concatenate([edges, rng.standard_normal(200_000) * np.exp(rng.uniform(-30, 12, 200_000))])
    m = values.astype(np.float32).reshape(-1, 2, 2)                      # rows of 4 values, several parts of 32768
    for dtype in ("float16", "float32"):
        with np.errstate(over="ignore", invalid="ignore"):
            want = m.astype(dtype)
        got = extractor._cast(m, dtype)
        assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8))
        uint, exponent = extractor.EXPONENT_BITS[dtype]
        finite = (got.view(uint).reshape(len(m), -1) & exponent).max(1) != exponent
        assert np.array_equal(finite, np.isfinite(want).reshape(len(m), -1).all(1))
    assert not np.isfinite(extractor._cast(m[:3], "float16")).all()      # 65520 and beyond overflow, as numpy's
