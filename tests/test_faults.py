"""Slips of the hand: a run folder is never replaced silently, whatever the head; training options are
checked at the door."""
import pytest
import torch

from cachegen import order_cache
from pipeline.errors import ConfigError, PipelineError
from pipeline.fewshot.train import TrainConfig, train

FAST = dict(n_way=2, k_shot=1, q_query=1, val_every=5, val_episodes=3, val_query=2, episodes=5)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return order_cache(tmp_path_factory.mktemp("c") / "order.h5", n_pairs=3, videos=6)


@pytest.mark.parametrize("first,second", [
    (dict(head="lstm", head_options={"hidden": 8}), dict(head="mean")),                 # trained, then parameter-free
    (dict(head="otam", head_options={"clips": 3}), dict(head="otam", head_options={"clips": 3, "smoothing": 0.5})),
    (dict(head="mean"), dict(head="lstm", head_options={"hidden": 8})),
    (dict(head="lstm", head_options={"hidden": 8}), dict(head="lstm", head_options={"hidden": 8}, lr=5e-3)),
])
def test_a_run_folder_holding_another_run_is_refused_unless_overwrite(cache, tmp_path, first, second):
    quiet = dict(progress=False, log=lambda *a: None)
    train(cache, tmp_path / "run", TrainConfig(**first, **FAST), **quiet)
    before = (tmp_path / "run/seed-0/best.pt").read_bytes()
    with pytest.raises(PipelineError, match=r"seed-0 holds another run \(.+\); pass --overwrite"):
        train(cache, tmp_path / "run", TrainConfig(**second, **FAST), **quiet)
    assert (tmp_path / "run/seed-0/best.pt").read_bytes() == before          # nothing replaced
    train(cache, tmp_path / "run", TrainConfig(**first, **FAST), **quiet)   # the same run again: allowed
    train(cache, tmp_path / "run", TrainConfig(**second, **FAST), overwrite=True, **quiet)
    saved = torch.load(tmp_path / "run/seed-0/best.pt", weights_only=False)
    assert saved["head"] == second["head"] and saved["train_config"]["lr"] == second.get("lr", saved["train_config"]["lr"])


@pytest.mark.parametrize("bad,message", [
    (dict(loss="ce", scale=0.0), "scale"), (dict(margin=-5.0), "margin"), (dict(margin=-1.0), "margin"), (dict(lr=float("inf")), "lr"),
    (dict(gamma=0.0), "gamma"), (dict(lr=-1e-3), "lr"), (dict(margin=1.0), "margin"),
])
def test_training_options_are_checked_at_the_door(bad, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(head="lstm", **bad)


def test_every_preset_run_is_a_valid_training_config():
    """Each run of every params preset parses (the ablations' m = -0.2 included), with its head's loss."""
    from pathlib import Path

    import yaml
    root = Path(__file__).resolve().parents[1]
    keys = set(yaml.safe_load((root / "params.yaml").read_text()))
    for preset in [root / "params.yaml", *sorted((root / "configs").glob("*.yaml"))]:
        if preset.name == "temporal_matching.yaml":     # the study's heads, read by its own pipeline (below)
            continue
        assert set(yaml.safe_load(preset.read_text())) == keys, f"{preset.name}: not the sections of params.yaml"
        runs = yaml.safe_load(preset.read_text()).get("runs")
        assert runs, f"{preset.name}: no runs"
        for name, run in runs.items():
            TrainConfig.from_mapping(run, f"{preset.name}: runs.{name}")
    study = yaml.safe_load((root / "studies/temporal_matching/params.yaml").read_text())
    heads = yaml.safe_load((root / "configs/temporal_matching.yaml").read_text())["heads"]
    assert set(study["heads"]) == set(heads)
    for name in study["heads"]:
        for shot in study["shots"]:
            cfg = TrainConfig.from_mapping(dict(study["training"], **heads[name], k_shot=shot), name)
            assert cfg.loss == "ce" and cfg.training_seeds() == [1, 5, 10] and cfg.schedule()[0] == "plain_sgd"


def test_an_episode_file_is_bound_to_the_videos_in_their_order(tmp_path):
    import numpy as np
    from pipeline.fewshot.episodes import episode_file, fixed_episodes
    ids = np.array([f"{c}/{c}_{i}" for c in "abc" for i in range(4)])
    by_class = {c: np.arange(4 * j, 4 * j + 4) for j, c in enumerate("abc")}
    shuffled = ids[::-1].copy()
    by_class_shuffled = {c: np.sort(len(ids) - 1 - v) for c, v in by_class.items()}
    args = ("test", 2, 1, 1, 5, 0)
    assert episode_file(tmp_path / "c.h5", ids, *args) != episode_file(tmp_path / "c.h5", shuffled, *args)
    a = fixed_episodes(tmp_path / "c.h5", ids, by_class, *args)
    b = fixed_episodes(tmp_path / "c.h5", shuffled, by_class_shuffled, *args)
    fresh = fixed_episodes(tmp_path / "other.h5", shuffled, by_class_shuffled, *args)
    assert np.array_equal(b, fresh)                 # the history of the folder does not matter
    assert len(list((tmp_path / "c.episodes").glob("*.npz"))) == 2 and a.shape == b.shape


def test_the_same_result_spelled_with_other_paths_is_the_same_result(tmp_path, monkeypatch):
    from pipeline.fewshot.evaluate import write_metrics
    monkeypatch.chdir(tmp_path)
    result = dict(accuracy=0.5, cache="cache/c.h5", per_seed=[dict(seed=0, checkpoint="runs/r/seed-0/best.pt")])
    write_metrics(tmp_path / "m.json", result)
    absolute = dict(result, cache=str(tmp_path / "cache/c.h5"),
                    per_seed=[dict(seed=0, checkpoint=str(tmp_path / "runs/r/../r/seed-0/best.pt"))])
    write_metrics(tmp_path / "m.json", absolute)                                    # not "another result"
    with pytest.raises(PipelineError, match="--overwrite"):
        write_metrics(tmp_path / "m.json", dict(absolute, accuracy=0.6))


def test_small_slips_each_get_one_line(trained, tmp_path):
    from conftest import cli, write_video
    ck = str(trained / "run" / "seed-0" / "best.pt")
    (tmp_path / "empty").mkdir()
    sup = tmp_path / "support"
    for c in "ab":
        write_video(sup / c / f"{c}.avi", 14, size=(48, 40))
    junk = tmp_path / "q" / "junk.avi"
    junk.parent.mkdir()
    junk.write_bytes(b"not a video")
    cases = [
        (["extract", "--root", str(trained / "data"), "--split", str(trained / "split"), "--out",
          str(tmp_path / "x.h5"), "--shard", "0/0"], "shard count 0 must be at least 1"),
        (["predict", "--checkpoint", ck, "--support", str(tmp_path / "nowhere"), str(junk)],
         "--support " + str(tmp_path / "nowhere") + " does not exist"),
        (["predict", "--checkpoint", ck, "--support", str(sup), str(tmp_path / "empty")], "no query video in"),
        (["predict", "--checkpoint", ck, "--support", str(sup), "--cache-dir", str(tmp_path / "pc"), str(junk)],
         "none of the 1 query videos could be read"),
        (["extract", "--root", str(tmp_path / "nowhere"), "--split", str(trained / "split"), "--out", ck],
         "does not exist"),
        (["train", "--cache", str(trained / "c.h5"), "--out", str(tmp_path / "refused"), "--head", "lstm", "--n-way", "2"],
         "(fewer queries: --val-query)"),
    ]
    for args, message in cases:
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr, (args, r.stderr)
    assert sorted(p.name for p in (trained / "run" / "seed-0").iterdir()) == ["best.pt", "curve.csv", "curve.json",
                                                                            "last.pt"]   # no lock file left
    assert not (tmp_path / "refused").exists()          # a refused run writes nothing


@pytest.fixture
def small_fs(tmp_path):
    """Mounts a 1 MB tmpfs and a read-only tmpfs (root with mount rights, as in CI's container);
    elsewhere the test is skipped and test_the_one_write_path_turns_refusals_into_one_line covers
    the same path with simulated refusals."""
    import subprocess
    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root with mount rights)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], check=True)
    yield full, ro
    subprocess.run(["umount", str(full)])
    subprocess.run(["umount", str(ro)])


def test_full_and_read_only_disks_are_one_line_and_leave_nothing(trained, small_fs, tmp_path):
    from conftest import cli
    full, ro = small_fs
    c, run = str(trained / "c.h5"), str(trained / "run")
    data = ["--root", str(trained / "data"), "--split", str(trained / "split")]
    (tmp_path / "adir.json").mkdir()
    cases = [
        (["extract", *data, "--out", str(full / "x.h5"), "--workers", "0"], "free space there or write elsewhere"),
        (["extract", *data, "--out", str(ro / "x.h5"), "--workers", "0"], "read-only"),
        (["train", "--cache", c, "--out", str(ro / "r"), "--head", "mean", "--n-way", "2"], "read-only"),
        (["eval", run, "--cache", c, "--n-way", "2", "--episodes", "2", "--runs", "1", "--metrics",
          str(ro / "m.json")], "read-only"),
        (["eval", run, "--cache", c, "--n-way", "2", "--episodes", "2", "--runs", "1", "--metrics",
          str(tmp_path / "adir.json"), "--overwrite"], "is a folder where a file is expected"),
        (["extract", *data, "--out", str(tmp_path / "adir.json"), "--workers", "0", "--overwrite"],
         "is a folder where a file is expected"),
        (["predict", "--checkpoint", run + "/seed-0/best.pt", "--support", str(trained / "data"),
          "--cache-dir", str(ro / "pc"), str(trained / "data" / "a" / "a0.avi")], "read-only"),
    ]
    for args, message in cases:
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert message in lines[-1] and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
    # a checkpoint onto a full disk: one line, no temporary file left
    filler = full / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024 - 64 * 1024))
    r = cli("train", "--cache", c, "--out", str(full / "r"), "--head", "lstm", "--n-way", "2", "--episodes", "2",
            "--val-every", "2", "--val-episodes", "2", "--val-query", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not list(full.rglob("*.tmp*")), list(full.rglob("*"))
    assert [p.name for p in full.iterdir()] == ["filler"] or not list((full / "r").rglob("*.pt"))


def test_the_one_write_path_turns_refusals_into_one_line(tmp_path, monkeypatch):
    """The same refusals, simulated where no small file system can be mounted."""
    import errno
    import shutil
    from collections import namedtuple

    from pipeline import files
    from pipeline.errors import MachineFault, explain_os_error
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 6, 10 ** 6 - 1000, 1000))
    with pytest.raises(MachineFault, match=r"needs about 1.0 MB and 1.0 KB are free"):
        files.check_output(tmp_path / "x.h5", "feature cache", need_bytes=10 ** 6)
    files.check_output(tmp_path / "x.h5", "feature cache", need_bytes=500)
    monkeypatch.setattr(files.os, "access", lambda p, mode: False)
    with pytest.raises(MachineFault, match="permission denied|read-only"):
        files.check_output(tmp_path / "r", "run folder", folder=True)
    assert explain_os_error(OSError(errno.ENOSPC, "No space left on device", "/x/y.h5")) == \
        "/x/y.h5: no space left on its device: free space there or write elsewhere"
    h5 = OSError("Unable to synchronously create file (unable to open file: name = '/ro/c.h5', errno = 30, "
                 "error message = 'Read-only file system', flags = 13, o_flags = 242)")
    assert explain_os_error(h5) == "/ro/c.h5: the file system is read-only: write to a writable folder"
    assert explain_os_error(OSError(errno.ECONNRESET, "reset")) is None      # not a write refusal: traceback


def test_a_file_in_two_parts_is_refused_unless_allowed_and_then_recorded(tmp_path):
    import shutil

    from conftest import cli, write_video
    for c in "abcd":
        for i in range(2):
            write_video(tmp_path / "data" / c / f"{c}{i}.avi", 12 + 2 * i + (ord(c) - 97) * 4, size=(48, 40))
    shutil.copy(tmp_path / "data/a/a0.avi", tmp_path / "data/d/leak.avi")       # a train video in test
    (tmp_path / "data/d/link.avi").symlink_to(tmp_path / "data/d/d0.avi")       # the same file twice in test
    split = tmp_path / "split"
    split.mkdir()
    for part, cs in (("train", "ab"), ("val", "c"), ("test", "d")):
        (split / f"{part}_classes.txt").write_text("\n".join(cs))
    args = ["extract", "--root", str(tmp_path / "data"), "--split", str(split), "--out", str(tmp_path / "c.h5"),
            "--clips", "1", "--frames", "4", "--resize", "64", "--crop", "32", "--workers", "0"]
    r = cli(*args)
    assert r.returncode == 2 and "appear in more than one part" in r.stderr and "a/a0 in train" in r.stderr, r.stderr
    assert not (tmp_path / "c.h5").exists()
    r = cli(*args, "--allow-duplicates")
    assert r.returncode == 0, r.stderr
    assert "byte-identical files within one part" in r.stderr
    r = cli("info", str(tmp_path / "c.h5"))
    assert "byte-identical files (same sha256): 2 group(s): a/a0 = d/leak; d/d0 = d/link" in r.stdout, r.stdout
    r = cli("scan", "--root", str(tmp_path / "data"), "--split", str(split), "--probe")
    assert r.returncode == 0 and "byte-identical files (across parts test/train: extract refuses them): a/a0 = d/leak" \
        in r.stdout and "byte-identical files (within test): d/d0 = d/link" in r.stdout, r.stdout
    (split / "val_classes.txt").write_text("\n")
    r = cli("scan", "--root", str(tmp_path / "data"), "--split", str(split))
    assert r.returncode == 2 and "val_classes.txt: lists no class" in r.stderr, r.stderr
