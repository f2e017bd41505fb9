"""Kinetics and Something-Something-V2 as distributed, on generated stand-ins (mp4 and webm files,
label JSONs with templates, some listed videos missing): scan -> extract -> train -> eval."""
import json

import numpy as np
import pytest

from conftest import SMALL, cli, write_video
from pipeline.extraction.datasets import DatasetError, load_split, missing_videos, resolve

KINETICS = {"train": ["air drumming", "blowing glass"], "val": ["cutting watermelon", "dancing ballet"],
            "test": ["busking", "ice fishing"]}
SSV2 = {"train": ["Pouring something into something", "Pushing something from left to right"],
        "val": ["Lifting something up completely without letting it drop down", "Tearing something into two pieces"],
        "test": ["Twisting (wringing) something wet until water comes out", "Poking a hole into something soft"]}
PER_CLASS = 4


def write_split(d, classes, videos):
    d.mkdir(parents=True)
    for part in classes:
        (d / f"{part}_classes.txt").write_text("\n".join(classes[part]) + "\n")
        (d / f"{part}_videos.txt").write_text("\n".join(videos[part]) + "\n")
    return d


@pytest.fixture
def kinetics(tmp_path):
    """Folders named as distributed (one with underscores, as some copies have), mp4 and webm files
    named <youtube_id>_<start>_<end>; the split lists one video per part that is not there."""
    root, videos, k = tmp_path / "kinetics", {}, 0
    for part, classes in KINETICS.items():
        videos[part] = []
        for c in classes:
            folder = c.replace(" ", "_") if c == "busking" or c == "ice fishing" else c
            for i in range(PER_CLASS + (c == classes[0])):
                stem = f"{k:011d}"[:11].replace("0", "x", 2) + f"_{i * 10:06d}_{i * 10 + 10:06d}"
                k += 1
                videos[part].append(f"{c}/{stem}")
                if c == classes[0] and i == PER_CLASS:
                    continue                                  # listed, never downloaded
                ext, fourcc = (".webm", "VP80") if i % 2 else (".mp4", "mp4v")
                write_video(root / folder / f"{stem}{ext}", 12 + 3 * i, fourcc, size=(48, 40), start=10 + k)
    return root, write_split(tmp_path / "split_k", KINETICS, videos)


@pytest.fixture
def ssv2(tmp_path):
    root = tmp_path / "ssv2"
    labels, listed, videos, vid = {}, [], {}, 1000
    for part, classes in SSV2.items():
        videos[part] = []
        for c in classes:
            labels[c] = str(len(labels))
            template = c.replace("something", "[something]", 1)
            for i in range(PER_CLASS + (c == classes[0])):
                vid += 1
                videos[part].append(f"{c}/{vid}")
                listed.append(dict(id=str(vid), label=c.lower(), template=template, placeholders=["a cup"]))
                if not (c == classes[0] and i == PER_CLASS):
                    write_video(root / "20bn-something-something-v2" / f"{vid}.webm", 12 + 3 * i, "VP80", size=(48, 40),
                                start=vid - 990)
    (root / "labels").mkdir()
    (root / "labels/something-something-v2-labels.json").write_text(json.dumps(labels))
    (root / "labels/something-something-v2-train.json").write_text(json.dumps(listed[:20]))
    (root / "labels/something-something-v2-validation.json").write_text(json.dumps(listed[20:]))
    return root, write_split(tmp_path / "split_s", SSV2, videos)


@pytest.mark.parametrize("layout", ["kinetics", "ssv2"])
def test_scan_extract_train_eval_with_missing_videos(layout, kinetics, ssv2, tmp_path):
    root, split = kinetics if layout == "kinetics" else ssv2
    r = cli("scan", "--root", str(root), "--split", str(split), "--layout", layout,
            "--missing-list", str(tmp_path / "missing.txt"))
    assert r.returncode == 0, r.stderr
    assert "1 listed video(s) missing, in 1 class(es)" in r.stdout and "3 listed video(s) missing" in r.stdout
    missing = (tmp_path / "missing.txt").read_text().split("\n")[:-1]
    assert len(missing) == 3 and all(m.split("/")[0] in sum(KINETICS.values(), []) + sum(SSV2.values(), [])
                                     for m in missing)
    out = tmp_path / "c.h5"
    r = cli("extract", "--root", str(root), "--split", str(split), "--layout", layout, "--out", str(out), *SMALL)
    assert r.returncode == 2 and "use --allow-missing" in r.stderr and not out.exists()
    r = cli("extract", "--root", str(root), "--split", str(split), "--layout", layout, "--out", str(out), *SMALL,
            "--allow-missing")
    assert r.returncode == 0, r.stderr
    assert "0 video(s) failed" not in r.stdout and "failed" not in r.stdout       # webm and mp4 all decode
    from pipeline.store import FeatureStore
    with FeatureStore(out) as st:
        assert len(st) == 24 and sorted(sum(st.provenance["missing"].values(), [])) == sorted(missing)
        assert (st.videos["n_frames"] >= 12).all()
    r = cli("train", "--cache", str(out), "--out", str(tmp_path / "run"), "--head", "mean", "--n-way", "2",
            "--val-episodes", "5", "--val-query", "2")
    assert r.returncode == 0, r.stderr
    r = cli("eval", str(tmp_path / "run"), "--cache", str(out), "--n-way", "2", "--q-query", "3", "--episodes", "10",
            "--runs", "1", "--metrics", str(tmp_path / "m.json"))
    assert r.returncode == 0, r.stderr
    assert "1 listed test video(s) in 1 class(es)" in r.stdout and "3 in all parts" in r.stdout
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["missing"]["videos"] == 1 and m["missing"]["all_parts"] == 3


def test_ssv2_labels_that_do_not_fit_are_clear_errors(ssv2):
    root, split_dir = ssv2
    split = load_split(split_dir)
    labels = root / "labels/something-something-v2-labels.json"
    good = labels.read_text()
    labels.write_text(good[:-5])
    with pytest.raises(DatasetError, match="something-something-v2-labels.json: not a readable JSON file"):
        resolve(split, root, "ssv2")
    names = json.loads(good)
    del names["Poking a hole into something soft"]
    labels.write_text(json.dumps(names))
    with pytest.raises(DatasetError, match="1 class.* not templates of .*: Poking a hole into something soft"):
        resolve(split, root, "ssv2")
    labels.write_text(good)
    train = root / "labels/something-something-v2-train.json"
    listed = json.loads(train.read_text())
    listed[0]["template"] = "Pushing [something] from left to right"
    train.write_text(json.dumps(listed))
    with pytest.raises(DatasetError, match="another template .*Pouring something into something/1001 is "
                                           "'Pushing something from left to right'"):
        resolve(split, root, "ssv2")


def test_a_webm_that_does_not_decode_is_recorded_and_the_rest_extracted(ssv2, tmp_path):
    root, split = ssv2
    broken = next((root / "20bn-something-something-v2").glob("*.webm"))
    broken.write_bytes(b"\x1aE\xdf\xa3" + bytes(200))                 # an EBML header and nothing else
    out = tmp_path / "c.h5"
    r = cli("extract", "--root", str(root), "--split", str(split), "--layout", "ssv2", "--out", str(out), *SMALL,
            "--allow-missing")
    assert r.returncode == 0, r.stderr
    assert "1 video(s) failed" in r.stdout and broken.stem in r.stdout


def test_missing_videos_per_part(kinetics):
    root, split_dir = kinetics
    split = load_split(split_dir)
    entries, problems = resolve(split, root, "kinetics", allow_missing=True)
    gone = missing_videos(split, entries)
    assert [len(gone[p]) for p in ("train", "val", "test")] == [1, 1, 1]
    assert len(entries) == 24 and len(problems) == 3
    assert np.all([e.path.is_file() for e in entries])
