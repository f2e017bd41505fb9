import json
import subprocess
import sys
from pathlib import Path

from conftest import cli, flat_video


def test_predicts_an_easily_separable_case_and_reuses_the_support_cache(trained, tmp_path):
    sup = tmp_path / "support"
    for i in range(2):
        flat_video(sup / "blue" / f"b{i}.avi", 60 + 10 * i)
        flat_video(sup / "red" / f"r{i}.avi", 200 + 10 * i)
    queries = [flat_video(tmp_path / "q" / "qb.avi", 75), flat_video(tmp_path / "q" / "qr.avi", 215)]
    args = ["predict", "--checkpoint", str(trained / "run/seed-0/best.pt"), "--support", str(sup), "--cache-dir",
            str(tmp_path / "pc"), "--json"]
    r = cli(*args, str(queries[0]), str(queries[1]))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [x["predicted"] for x in out["results"]] == ["blue", "red"]
    assert out["decoded"] == 6 and out["reused_support"] == 0
    assert all(x["margin"] > 0 and set(x["scores"]) == {"blue", "red"} for x in out["results"])
    # more queries: the support set is not decoded again
    extra = flat_video(tmp_path / "q" / "qb2.avi", 80)
    out = json.loads(cli(*args, str(tmp_path / "q")).stdout)
    assert out["reused_support"] == 4 and out["decoded"] == 1
    assert [x["predicted"] for x in out["results"]] == ["blue", "blue", "red"] and extra.exists()
    # one more example in a class: only that video is decoded
    flat_video(sup / "red" / "r9.avi", 230)
    out = json.loads(cli(*args, str(queries[0])).stdout)
    assert out["decoded"] == 1 and out["reused_support"] == 4
    csv = cli(*args[:-1], "--csv", str(queries[1])).stdout.splitlines()
    assert csv[0] == "query,predicted,margin,blue,red" and ",red," in csv[1]


def test_error_cases(trained, tmp_path):
    ck = str(trained / "run/seed-0/best.pt")
    one = tmp_path / "one"
    flat_video(one / "only" / "x.avi", 50)
    r = cli("predict", "--checkpoint", ck, "--support", str(one), str(one / "only" / "x.avi"))
    assert r.returncode == 2 and "at least 2 class folders" in r.stderr
    bad = tmp_path / "bad"
    flat_video(bad / "good" / "g.avi", 50)
    (bad / "broken").mkdir()
    (bad / "broken" / "b.avi").write_bytes(b"junk")
    r = cli("predict", "--checkpoint", ck, "--support", str(bad), str(bad / "good" / "g.avi"))
    assert r.returncode == 2 and "broken: no readable video" in r.stderr
    sup = tmp_path / "ok"
    flat_video(sup / "u" / "u.avi", 50)
    flat_video(sup / "v" / "v.avi", 220)
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"")
    r = cli("predict", "--checkpoint", ck, "--support", str(sup), "--cache-dir", str(tmp_path / "pc"), "--json",
            str(junk), str(sup / "u" / "u.avi"))
    assert r.returncode == 0
    res = json.loads(r.stdout)["results"]
    assert "empty file" in res[0]["error"] and res[1]["predicted"] == "u"
    assert "could not be read" in r.stderr
    r = cli("predict", "--checkpoint", ck, "--support", str(sup), "--weights", str(junk), str(sup / "u" / "u.avi"))
    assert r.returncode == 2 and "random-init" in r.stderr


def test_a_fifo_a_missing_file_and_a_folder_among_the_queries_do_not_stop_the_good_one(trained, tmp_path):
    import os
    sup = tmp_path / "ok"
    flat_video(sup / "u" / "u.avi", 50)
    flat_video(sup / "v" / "v.avi", 220)
    os.mkfifo(sup / "v" / "pipe.avi")          # a support FIFO: skipped by the folder scan
    q = tmp_path / "q"
    os.mkfifo(q.mkdir() or q / "pipe.avi")
    (q / "dir.avi").mkdir()
    flat_video(q / "good.avi", 215)
    r = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--checkpoint", str(trained / "run/seed-0/best.pt"),
                        "--support", str(sup), "--cache-dir", str(tmp_path / "pc"), "--json", str(q / "gone.avi"),
                        str(q)], capture_output=True, text=True, timeout=120)    # the folder: dir.avi, good, pipe
    assert r.returncode == 0, r.stderr
    res = {Path(x["query"]).name: x for x in json.loads(r.stdout)["results"]}
    assert res["good.avi"]["predicted"] == "v"
    assert "not a regular file" in res["pipe.avi"]["error"] and "not a regular file" in res["dir.avi"]["error"]
    assert res["gone.avi"]["error"] == "no such file"
    assert "pipe.avi: named like a video but not a regular file" in r.stderr


def test_info_on_cache_and_checkpoint(trained):
    r = cli("info", str(trained / "c.h5"))
    assert r.returncode == 0 and "24 videos" in r.stdout and "train: 3 classes, 9 videos ok" in r.stdout
    r = cli("info", str(trained / "run/seed-0/best.pt"))
    assert r.returncode == 0 and "head mean" in r.stdout and "trained on cache" in r.stdout
    assert cli("info", str(trained / "nope.h5")).returncode == 2


def test_relation_head_predicts_too(trained, tmp_path):
    r = cli("train", "--cache", str(trained / "c.h5"), "--out", str(tmp_path / "rvn"), "--head", "rvn3", "--loss", "mse",
            "--n-way", "2", "--episodes", "10", "--val-every", "10", "--val-episodes", "2", "--val-query", "2")
    assert r.returncode == 0, r.stderr
    sup = tmp_path / "support"
    flat_video(sup / "blue" / "b.avi", 60)
    flat_video(sup / "red" / "r.avi", 200)
    r = cli("predict", "--checkpoint", str(tmp_path / "rvn/seed-0/best.pt"), "--support", str(sup), "--cache-dir",
            str(tmp_path / "pc"), "--json", str(flat_video(tmp_path / "q.avi", 65)))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["results"][0]
    assert json.loads(r.stdout)["head"] == "rvn3"
    assert set(res["scores"]) == {"blue", "red"} and all(0 <= s <= 1 for s in res["scores"].values())
