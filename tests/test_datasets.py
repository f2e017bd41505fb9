import os

import pytest

from pipeline.extraction.datasets import DatasetError, load_split, resolve, scan

# The paper's supplementary lists, as printed (spaces, "Ski-jet"), for the classes that differ
# from the folder names; the configs must hold the real folder names.
PAPER_UCF_TRAIN_SAMPLE = ["MilitaryParade", "Ski-jet", "SoccerPenalty", "ThrowDiscus"]
PAPER_HMDB_TEST = ["pushup", "kick ball", "pick", "run", "kick", "talk", "sit", "smoke", "fencing", "pour"]


def folder(name):
    return name.replace(" ", "_").replace("Ski-jet", "Skijet")


def test_arn_ucf101_split_has_the_papers_classes():
    s = load_split("arn_ucf101")
    assert [len(s.classes[p]) for p in ("train", "val", "test")] == [70, 10, 21]
    assert all(folder(c) in s.classes["train"] for c in PAPER_UCF_TRAIN_SAMPLE)
    assert "Ski-jet" not in s.classes["train"]
    assert sum(len(v) for v in s.videos.values()) == 13320
    assert "HandstandPushups/v_HandStandPushups_g01_c01" in s.videos["val"]


def test_arn_hmdb51_split_uses_folder_names():
    s = load_split("arn_hmdb51")
    assert [len(s.classes[p]) for p in ("train", "val", "test")] == [31, 10, 10]
    assert sorted(s.classes["test"]) == sorted(folder(c) for c in PAPER_HMDB_TEST)


@pytest.mark.parametrize("name", ["cmn_kinetics100", "cmn_ssv2_100"])
def test_cmn_splits_load(name):
    s = load_split(name)
    assert [len(s.classes[p]) for p in ("train", "val", "test")] == [64, 12, 24]
    assert len(s.videos["test"]) == 2400


def write_split(d, train, val, test, videos=None):
    d.mkdir(parents=True, exist_ok=True)
    for part, cs in zip(("train", "val", "test"), (train, val, test)):
        (d / f"{part}_classes.txt").write_text("\n".join(cs) + "\n")
        if videos:
            (d / f"{part}_videos.txt").write_text("\n".join(videos[part]) + "\n")
    return d


def test_overlapping_classes_and_wrong_counts_are_errors(tmp_path):
    with pytest.raises(DatasetError, match="both train and test: a"):
        load_split(write_split(tmp_path / "s1", ["a", "b"], ["c"], ["a"]))
    with pytest.raises(DatasetError, match=r"expected \(3, 1, 1\)"):
        load_split(write_split(tmp_path / "s2", ["a", "b"], ["c"], ["d"]), expected=(3, 1, 1))
    with pytest.raises(DatasetError, match="no such folder"):
        load_split(tmp_path / "nope")


@pytest.fixture
def root(tmp_path, make_video):
    for c in "abcd":
        for i in range(2):
            make_video(f"data/{c}/{c}_{i}.avi", 5)
    (tmp_path / "data/a/notes.txt").write_text("hi")
    return tmp_path / "data"


def test_resolve_lists_videos_and_reports_non_videos(root, tmp_path):
    split = load_split(write_split(tmp_path / "s", ["a", "b"], ["c"], ["d"]))
    entries, problems = resolve(split, root)
    assert [e.id for e in entries][:2] == ["a/a_0", "a/a_1"]
    assert {e.part for e in entries if e.class_name == "d"} == {"test"}
    assert [e.label for e in entries] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(problems) == 1 and problems[0][0].endswith("notes.txt") and "not a video" in problems[0][1]


def test_missing_class_folder_is_named(root, tmp_path):
    split = load_split(write_split(tmp_path / "s", ["a", "zz"], ["c"], ["d"]))
    with pytest.raises(DatasetError, match="missing under .*: zz"):
        resolve(split, root)


def test_missing_listed_videos_are_counted_and_named(root, tmp_path):
    vids = {"train": ["a/a_0", "a/a_9", "b/b_7"], "val": ["c/c_0"], "test": ["d/d_1"]}
    split = load_split(write_split(tmp_path / "s", ["a", "b"], ["c"], ["d"], vids))
    with pytest.raises(DatasetError, match="2 of 3 train videos .* a/a_9, b/b_7"):
        resolve(split, root)
    entries, problems = resolve(split, root, allow_missing=True)
    assert [e.id for e in entries] == ["a/a_0", "c/c_0", "d/d_1"]
    assert any("2 of 3 train videos" in why for _, why in problems)


def test_missing_root_and_unknown_layout(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="unknown layout"):
        scan(tmp_path, "kinetics400")


def test_ucf101_naming_is_checked(tmp_path, make_video):
    make_video("u/HandstandPushups/v_HandStandPushups_g01_c01.avi", 3)
    make_video("u/HandstandPushups/clip.avi", 3)
    found, problems = scan(tmp_path / "u", "ucf101")
    assert len(found["HandstandPushups"]) == 2
    assert [p[0].endswith("clip.avi") for p in problems] == [True]


def test_folders_fifos_and_broken_links_named_like_videos_get_their_own_reason(tmp_path, make_video):
    make_video("d/a/clip.avi", 3)
    (tmp_path / "d/a/folder.avi").mkdir()
    (tmp_path / "d/a/gone.avi").symlink_to(tmp_path / "nowhere.avi")
    os.mkfifo(tmp_path / "d/a/pipe.avi")
    found, problems = scan(tmp_path / "d")
    assert [f.name for f in found["a"]] == ["clip.avi"]
    why = {p.rsplit("/", 1)[1]: w for p, w in problems}
    assert why == {"folder.avi": "named like a video but a folder; skipped",
                   "gone.avi": "named like a video but a broken symbolic link; skipped",
                   "pipe.avi": "named like a video but not a regular file; skipped"}


def test_two_files_of_one_video_are_an_error_naming_both(tmp_path, make_video):
    for c in ("a", "b", "c"):
        make_video(f"d/{c}/clip.avi", 3)
    make_video("d/a/clip.mp4", 3, "mp4v")
    sp = tmp_path / "sp"
    sp.mkdir()
    for part, classes in (("train", "a"), ("val", "b"), ("test", "c")):
        (sp / f"{part}_classes.txt").write_text(classes + "\n")
    with pytest.raises(DatasetError, match=r"1 video\(s\) with more than one file .*a/clip: clip.avi and clip.mp4"):
        resolve(load_split(sp), tmp_path / "d")
