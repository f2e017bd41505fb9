"""The matching study's release imported and scored: stand-ins written in its formats (torch.save,
per-video folders, saved episodes), import -> train -> import episodes -> eval -> report, and every
bad input as one line with exit code 2."""
import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from conftest import cli
from pipeline.fewshot.features import study_positions
from pipeline.importing import FeatureImportError, import_episodes, import_features
from pipeline.store import FeatureStore, verify
from pipeline.tools.standins import write_standins


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Stand-ins (6 test classes, 7 videos a class, 20 saved episodes per shot) and their import."""
    d = tmp_path_factory.mktemp("tm")
    write_standins(d / "rel", videos_per_class=7, episodes=20)
    import_features(d / "rel/features/ucf101", d / "c.h5", "temporal_matching", "r2plus1d_34", progress=False)
    return d


def fresh(release, tmp_path):
    """A copy of the stand-ins that a test may damage."""
    shutil.copytree(release / "rel", tmp_path / "rel")
    return tmp_path / "rel"


def test_their_loader_draws_as_its_code(release):
    # temporal_matching VideoFeatureReader.load_video_features, transcribed: pad short videos with the
    # last clip; else one clip from each of seq_len segments bounded by ceil(linspace(0, n, seq_len + 1))
    import math

    def theirs(n, seq_len, gen):
        if n <= seq_len:
            pos = list(range(n))
            while len(pos) < seq_len:
                pos.append(pos[-1])
            return pos
        b = np.linspace(0, n, seq_len + 1)
        return [gen.choice(range(math.ceil(b[i]), math.ceil(b[i + 1]))) for i in range(seq_len)]

    assert study_positions(3, 8, np.random.default_rng(0)) == [0, 1, 2, 2, 2, 2, 2, 2]
    assert study_positions(1, 8, np.random.default_rng(0)) == [0] * 8
    for n in (8, 9, 17, 29, 100):
        a, b = np.random.default_rng(n), np.random.default_rng(n)
        for _ in range(5):
            assert study_positions(n, 8, a) == theirs(n, 8, b)


def test_import_keeps_every_value_and_clip_name_and_is_verifiable(release):
    rel = release / "rel/features/ucf101"
    with FeatureStore(release / "c.h5") as st:
        v = st.videos
        assert st.imported and st.settings["feature_size"] == 512 and st.settings["backbone"] == "r2plus1d_34"
        assert len(st) == 21 * 7 and set(v["part"]) == {"train", "val", "test"}
        assert "Ωmega_spin" in set(v["class_name"]) and "café_pour" in set(v["class_name"])
        one = list(v["n_clips"]).index(1)                       # the 16-frame video: a 1-D tensor in its file
        vid = v["id"][one]
        assert torch.load(rel / v["part"][one] / vid / "video_features.pth").ndim == 1
        for i in (one, 1, 50):
            r, n = int(v["first_row"][i]), int(v["n_clips"][i])
            saved = torch.load(rel / v["part"][i] / v["id"][i] / "video_features.pth").numpy().reshape(n, -1)
            np.testing.assert_array_equal(st.f["pooled"][r:r + n], saved)
            lines = (rel / v["part"][i] / v["id"][i] / "clip_names.txt").read_text().splitlines()
            assert st.f["videos/clip_names"].asstr()[i].split("\n") == [ln.split(",")[0] for ln in lines]
        assert "maps" not in st.f and "steps" not in st.f
    assert verify(release / "c.h5", progress=False) == (147, [])
    r = cli("info", str(release / "c.h5"), "--verify")
    assert r.returncode == 0 and "imported clip vectors (512-d, from temporal_matching)" in r.stdout


def test_reimport_is_up_to_date_and_a_changed_file_is_refused(release, tmp_path):
    rel = fresh(release, tmp_path)
    out = tmp_path / "c.h5"
    args = ["import-features", "--root", str(rel / "features/ucf101"), "--out", str(out), "--backbone", "r21d"]
    assert cli(*args).returncode == 0
    r = cli(*args)
    assert r.returncode == 0 and "up to date" in r.stdout
    names = next((rel / "features/ucf101/val").glob("*/*/clip_names.txt"))
    names.write_text(names.read_text().replace(".jpg", ".png"))             # the clip names are the video's too
    r = cli(*args)
    assert r.returncode == 2 and "1 modified" in r.stderr and "--overwrite" in r.stderr
    f = next((rel / "features/ucf101/test").glob("*/*/video_features.pth"))
    torch.save(torch.zeros(3, 512), f)
    r = cli(*args)
    assert r.returncode == 2 and "2 modified" in r.stderr and "--overwrite" in r.stderr
    r = cli(*args[:-1], "other_backbone")
    assert r.returncode == 2 and "backbone" in r.stderr


def test_imported_episodes_score_exactly_their_saved_sequences(release, tmp_path):
    from pipeline.fewshot.evaluate import evaluate
    from pipeline.fewshot.train import TrainConfig, train
    cfg = TrainConfig(head="diag", optimizer="study", episodes=20, q_query=1, sampler="study", val_every=20,
                      val_episodes=10, val_query=1, seed_list=[1, 5])
    train(release / "c.h5", tmp_path / "diag", cfg, progress=False)
    ep = release / "rel/episodes/ucf101/ucf101_w5_s1"
    meta = import_episodes(ep, release / "c.h5", tmp_path / "w5s1.npz", progress=False)
    assert (meta["n_way"], meta["k_shot"], meta["q_query"], meta["count"], meta["clips"]) == (5, 1, 1, 20, 8)
    results, accs = evaluate([tmp_path / "diag"], release / "c.h5", runs=1, episodes_file=tmp_path / "w5s1.npz")
    assert accs[0].shape == (2, 20) and results[0]["episodes"] == 20 and results[0]["q_query"] == 1
    # the same accuracies from their saved tensors alone, through the trained head
    from pipeline.fewshot import checkpoint
    head = checkpoint.load(tmp_path / "diag/seed-1/best.pt").build_head().eval()
    mine = []
    for i in range(1, 21):
        s, q = (torch.load(ep / f"{side}_set_{i}.pth") for side in ("support", "target"))
        sl, ql = (torch.load(ep / f"{side}_labels_{i}.pth").long() for side in ("support", "target"))
        with torch.no_grad():
            zs = head.encode(s)[sl.argsort(stable=True)].unflatten(0, (5, 1))
            scores = head.scores(zs[None], head.as_query(head.encode(q))[None])[0]
        mine.append(float((scores.argmax(-1) == ql).float().mean()))
    np.testing.assert_allclose(accs[0][0], mine)


def test_the_pipeline_cli_end_to_end_and_the_report_beside_theirs(release, tmp_path):
    from stages.temporal_matching import side_by_side
    out = tmp_path / "study"
    for shot in (1, 5):
        r = cli("import-episodes", str(release / f"rel/episodes/ucf101/ucf101_w5_s{shot}"), "--cache",
                str(release / "c.h5"), "--out", str(out / f"episodes/w5s{shot}.npz"), "--count", "10")
        assert r.returncode == 0, r.stderr
    r = cli("train", "--cache", str(release / "c.h5"), "--out", str(out / "runs/max_1shot"), "--head", "max",
            "--optimizer", "study", "--episodes", "10", "--q-query", "1", "--val-every", "10", "--val-episodes", "5",
            "--val-query", "1", "--sampler", "study", "--seed-list", "1,5,10")
    assert r.returncode == 0, r.stderr
    r = cli("eval", str(out / "runs/max_1shot"), "--cache", str(release / "c.h5"), "--episodes-file",
            str(out / "episodes/w5s1.npz"), "--runs", "1", "--metrics", str(out / "metrics/max_1shot.json"))
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics/max_1shot.json").read_text())
    assert m["seeds"] == 3 and m["episodes"] == 10 and m["episodes_file"].endswith("w5s1.npz")
    preset = yaml.safe_load(open("configs/temporal_matching.yaml"))
    p = dict(dataset="ucf101", cache="c.h5", backbone="r2plus1d_34", heads=["max", "chamfer"],
             shots=[1], training=dict(seed_list=[1, 5, 10]))
    text = side_by_side(p, preset, out / "metrics")
    seeds = np.array(m["seed_means"]) * 100
    row = next(ln for ln in text.splitlines() if ln.startswith("| max | 1 |"))
    assert f"| 97.9 ± 0.1 | {seeds.mean():.1f} ± {seeds.std():.1f}" in row           # theirs from the preset
    assert f"{seeds.mean() - 97.9:+.1f}" in row
    assert "| chamfer | 1 | 97.7 ± 0.0 | (not run) |" in text and "scored on 10 of their saved episodes" in text


@pytest.mark.parametrize("damage,message", [
    ("dict", "holds a dict, not a tensor"),
    ("size", "256-d features, but"),
    ("nan", "non-finite values in clip(s) 2"),
    ("text", "not a readable .pth array"),
])
def test_a_bad_feature_file_is_one_line_naming_it(release, tmp_path, damage, message):
    rel = fresh(release, tmp_path)
    f = sorted((rel / "features/ucf101/val").glob("*/*/video_features.pth"))[3]
    x = torch.load(f)
    if damage == "dict":
        torch.save({"features": x}, f)
    elif damage == "size":
        torch.save(torch.zeros(len(x), 256), f)
    elif damage == "nan":
        x[2, 7] = float("nan")
        torch.save(x, f)
    else:
        f.write_text("not a tensor")
    r = cli("import-features", "--root", str(rel / "features/ucf101"), "--out", str(tmp_path / "c.h5"),
            "--backbone", "r21d")
    assert r.returncode == 2 and message in r.stderr and str(f) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not list(tmp_path.glob("c.h5*"))       # nothing half-written
    if damage == "nan":
        r = cli("import-features", "--root", str(rel / "features/ucf101"), "--out", str(tmp_path / "c.h5"),
                "--backbone", "r21d", "--drop-nonfinite")
        assert r.returncode == 0 and "failed:" in r.stdout
        with FeatureStore(tmp_path / "c.h5") as st:
            assert len(st.failures()) == 1 and "non-finite values in clip(s) 2" in st.failures()[0][1]


@pytest.mark.parametrize("damage,message", [
    ("absent", "episode 3: target video nowhere_000 is not among the cache's ok test videos"),
    ("features", "episode 3: the saved features of support video"),
    ("labels", "episode 3: label 0 holds videos of classes"),
    ("missing", "target_labels_3.pth: missing (episode 3 is incomplete)"),
    ("gap", "numbered from 1 without gaps; episode 3 is missing"),
    ("names", "was imported without clip names (no clip_names.txt in its folder)"),
])
def test_a_bad_saved_episode_is_one_line_naming_it(release, tmp_path, damage, message):
    rel = fresh(release, tmp_path)
    ep = rel / "episodes/ucf101/ucf101_w5_s1"
    if damage == "absent":
        lines = (ep / "target_frame_names_3.txt").read_text().splitlines()
        video = lines[0].split("/")[0]
        lines[0] = lines[0].replace(video + "/", "nowhere_000/")
        (ep / "target_frame_names_3.txt").write_text("\n".join(lines) + "\n")
    elif damage == "features":
        x = torch.load(ep / "support_set_3.pth")
        torch.save(x + 0.5, ep / "support_set_3.pth")
    elif damage == "labels":
        y = torch.load(ep / "support_labels_3.pth")
        torch.save(torch.roll(y, 1), ep / "support_labels_3.pth")
    elif damage == "missing":
        (ep / "target_labels_3.pth").unlink()
    elif damage == "gap":
        for f in ep.glob("*_3.*"):
            f.unlink()
    cache = release / "c.h5"
    if damage == "names":                        # a video folder without clip_names.txt, then an episode naming it
        video = (ep / "support_frame_names_1.txt").read_text().split("/")[0]
        next((rel / "features/ucf101/test").glob(f"*/{video}/clip_names.txt")).unlink()
        import_features(rel / "features/ucf101", tmp_path / "c.h5", "temporal_matching", "r21d", progress=False)
        folder = next((rel / "features/ucf101/test").glob(f"*/{video}"))
        cache, message = tmp_path / "c.h5", f"episode 1: support video {folder.parent.name}/{video} {message}"
    r = cli("import-episodes", str(ep), "--cache", str(cache), "--out", str(tmp_path / "e.npz"))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not list(tmp_path.glob("e.npz*"))


def test_the_files_layout_with_a_split_and_heads_that_need_maps_are_told(tmp_path):
    from pipeline.fewshot.train import TrainConfig, train
    split = tmp_path / "split"
    split.mkdir()
    rng = np.random.default_rng(0)
    for part, cs in (("train", "abc"), ("val", "d"), ("test", "e")):
        (split / f"{part}_classes.txt").write_text("\n".join(cs) + "\n")
        for c in cs:
            for i in range(4):
                f = tmp_path / "feats" / c / f"{c}{i}{'.npy' if i % 2 else '.pth'}"
                f.parent.mkdir(parents=True, exist_ok=True)
                x = rng.normal(size=(5, 64)).astype(np.float32)
                np.save(f, x) if f.suffix == ".npy" else torch.save(torch.from_numpy(x), f)
    r = cli("import-features", "--root", str(tmp_path / "feats"), "--out", str(tmp_path / "c.h5"), "--layout", "files",
            "--split", str(split), "--backbone", "mine")
    assert r.returncode == 0, r.stderr
    with FeatureStore(tmp_path / "c.h5") as st:
        assert len(st) == 20 and st.f["pooled"].shape == (100, 64) and list(st.videos["id"][:2]) == ["a/a0", "a/a1"]
    with pytest.raises(Exception, match="has no feature maps"):
        train(tmp_path / "c.h5", tmp_path / "r", TrainConfig(head="rvn1", n_way=2, val_query=2), progress=False)
    r = cli("train", "--cache", str(tmp_path / "c.h5"), "--out", str(tmp_path / "r2"), "--head", "otam",
            "--head-opt", "per_step=true", "--n-way", "2")
    assert r.returncode == 2 and "no per-time-step view" in r.stderr
    (split / "test_videos.txt").write_text("e/e0\ne/e3\n")              # a split's video lists pick the videos
    for part, cs in (("train", "abc"), ("val", "d")):
        (split / f"{part}_videos.txt").write_text("".join(f"{c}/{c}{i}\n" for c in cs for i in range(4)))
    import_features(tmp_path / "feats", tmp_path / "l.h5", "files", "mine", split=split, progress=False)
    with FeatureStore(tmp_path / "l.h5") as st:
        assert list(st.videos["id"][st.videos["part"] == "test"]) == ["e/e0", "e/e3"]
    np.save(tmp_path / "feats/a/a0.npy", np.zeros((2, 64), np.float32))    # beside a0.pth: one video, two files
    with pytest.raises(FeatureImportError, match="a0.npy and .*a0.pth: two files of one video"):
        import_features(tmp_path / "feats", tmp_path / "d.h5", "files", "mine", split=split, progress=False)
    (tmp_path / "feats/a/a0.npy").unlink()
    with pytest.raises(FeatureImportError, match="no folder for 1 class"):
        shutil.rmtree(tmp_path / "feats" / "e")
        import_features(tmp_path / "feats", tmp_path / "d.h5", "files", "mine", split=split, progress=False)


def test_pooled_clips_held_in_float16_take_half_the_memory_and_train(release, tmp_path):
    from pipeline.fewshot.features import load
    from pipeline.fewshot.train import TrainConfig, train
    with FeatureStore(release / "c.h5") as st:
        a, b = load(st, "train", "pooled"), load(st, "train", "pooled", pooled_dtype="float16")
    assert b.x.dtype == np.float16 and b.x.nbytes * 2 == a.x.nbytes
    np.testing.assert_array_equal(b.x, a.x.astype(np.float16))
    r = train(release / "c.h5", tmp_path / "r", TrainConfig(head="diag", episodes=10, q_query=1, val_every=10,
                                                            val_episodes=5, val_query=1, features_dtype="float16"),
              progress=False)
    assert r[0]["episodes"] == 10


def test_an_episode_file_is_used_only_as_it_was_imported(release, tmp_path):
    from pipeline.fewshot.evaluate import evaluate
    from pipeline.fewshot.train import TrainConfig, train
    ep = release / "rel/episodes/ucf101/ucf101_w5_s1"
    r = cli("import-episodes", str(ep), "--cache", str(release / "c.h5"), "--out", str(tmp_path / "e.npz"),
            "--count", "50")
    assert r.returncode == 2 and "--count 50, but it holds 20 saved episodes" in r.stderr
    assert cli("import-episodes", str(ep), "--cache", str(release / "c.h5"), "--out", str(tmp_path / "e.npz"),
               "--count", "12").returncode == 0
    r = cli("import-episodes", str(ep), "--cache", str(release / "c.h5"), "--out", str(tmp_path / "e.npz"))
    assert r.returncode == 2 and "exists: pass --overwrite" in r.stderr
    train(release / "c.h5", tmp_path / "run", TrainConfig(head="mean", n_way=5, val_query=1), progress=False)
    with pytest.raises(Exception, match="--runs 5 does not divide the 12 episodes"):
        evaluate([tmp_path / "run"], release / "c.h5", runs=5, episodes_file=tmp_path / "e.npz")
    r = cli("eval", str(tmp_path / "run"), "--cache", str(release / "c.h5"), "--episodes-file", str(tmp_path / "e.npz"),
            "--q-query", "3")
    assert r.returncode == 2 and "do not also give --q-query" in r.stderr
    other = fresh(release, tmp_path)                     # the same videos with one file changed: other contents
    f = sorted((other / "features/ucf101/train").glob("*/*/video_features.pth"))[0]
    torch.save(torch.load(f) + 1, f)
    import_features(other / "features/ucf101", tmp_path / "c2.h5", "temporal_matching", "r2plus1d_34", progress=False)
    with pytest.raises(Exception, match="imported against a cache of other contents"):
        evaluate([tmp_path / "run"], tmp_path / "c2.h5", runs=1, episodes_file=tmp_path / "e.npz")
