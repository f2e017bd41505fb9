"""Arguments are checked at the door: a bad value is one line naming the option, exit code 2, and
nothing is written; results are never written over silently."""
import json

import pytest
import torch

from conftest import cli

BAD = [
    (["eval", "r", "--cache", "c.h5", "--k-shot", "0"], "--k-shot"),
    (["eval", "r", "--cache", "c.h5", "--q-query", "0"], "--q-query"),
    (["eval", "r", "--cache", "c.h5", "--n-way", "1"], "--n-way"),
    (["eval", "r", "--cache", "c.h5", "--runs", "0"], "--runs"),
    (["eval", "r", "--cache", "c.h5", "--episodes", "-1"], "--episodes"),
    (["eval", "r", "--cache", "c.h5", "--part", "train"], "--part"),
    (["extract", "--root", "d", "--split", "demo", "--out", "o.h5", "--batch-size", "0"], "--batch-size"),
    (["extract", "--root", "d", "--split", "demo", "--out", "o.h5", "--part-size", "0"], "--part-size"),
    (["extract", "--root", "d", "--split", "demo", "--out", "o.h5", "--crop", "0"], "--crop"),
    (["extract", "--root", "d", "--split", "demo", "--out", "o.h5", "--views", "0"], "--views"),
    (["train", "--cache", "c.h5", "--out", "r", "--episodes", "-5"], "train.episodes"),
    (["train", "--cache", "c.h5", "--out", "r", "--episodes", "0"], "train.episodes"),
    (["train", "--cache", "c.h5", "--out", "r", "--lr", "0"], "train.lr"),
    (["train", "--cache", "c.h5", "--out", "r", "--gamma", "-5"], "train.gamma"),
    (["train", "--cache", "c.h5", "--out", "r", "--n-way", "1"], "train.n_way"),
]


@pytest.mark.parametrize("args,name", BAD, ids=[" ".join(a[-2:]) for a, _ in BAD])
def test_a_bad_value_is_one_line_naming_the_option(tmp_path, monkeypatch, args, name):
    monkeypatch.chdir(tmp_path)
    r = cli(*args)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []          # no episode file, no run folder, no parts folder


def test_two_checkpoints_of_one_run_keep_both_metrics_and_a_different_result_is_not_overwritten(trained, tmp_path):
    seed = trained / "run" / "seed-0"
    out = tmp_path / "m"
    common = ["--cache", str(trained / "c.h5"), "--n-way", "2", "--q-query", "1", "--episodes", "20", "--runs", "1"]
    r = cli("eval", str(seed / "best.pt"), str(seed / "last.pt"), *common, "--metrics", str(out))
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["run.seed-0.best.json", "run.seed-0.last.json"]
    last = json.loads((out / files[1]).read_text())["per_seed"][0]
    assert last["checkpoint"] == str(seed / "last.pt")
    curve = torch.load(seed / "last.pt", weights_only=False)["resume"]["curve"]
    assert last["val"] == (curve[-1]["val_accuracy"] if curve else last["val"])     # its own validation
    # the same result again (alone: no comparison with the other): written; another checkpoint's
    # result onto it: refused before any work, then --overwrite
    assert cli("eval", str(seed / "best.pt"), *common, "--metrics", str(out / files[0])).returncode == 0
    r = cli("eval", str(seed / "last.pt"), *common, "--metrics", str(out / files[0]))
    assert r.returncode == 2 and "holds the result of other checkpoints" in r.stderr and r.stdout == ""
    assert json.loads((out / files[0]).read_text())["run"] == "run.seed-0.best"
    r = cli("eval", str(seed / "last.pt"), *common, "--metrics", str(out / files[0]), "--overwrite")
    assert r.returncode == 0 and json.loads((out / files[0]).read_text())["run"] == "run.seed-0.last"


def test_a_last_checkpoint_reports_its_own_validation_not_the_best_so_far():
    from types import SimpleNamespace

    from pipeline.fewshot.evaluate import _own_val
    curve = [dict(val_accuracy=0.5), dict(val_accuracy=0.4)]
    assert _own_val(SimpleNamespace(resume=dict(curve=curve), best_val=0.5)) == 0.4      # last.pt
    assert _own_val(SimpleNamespace(resume=None, best_val=0.5)) == 0.5                   # best.pt
