"""A head from the user's own file, through train -> eval -> predict -> report, as docs/heads.md shows it."""
import json
import re
from pathlib import Path

import torch

from conftest import cli, flat_video

HEADS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "heads.md"

# Scores = cosine + a bonus for one class position: if evaluation and predict use the head's scores,
# every answer is that position, so test accuracy is exactly 1/N and predict always names that class.
FAVOURITE = '''
from dataclasses import dataclass
import torch
from pipeline.fewshot.heads import EmbeddingHead, option, register

@register("favourite")
class Favourite(EmbeddingHead):
    """Cosine to prototypes plus a bonus for one class position."""
    @dataclass
    class Options:
        position: int = option(0, "the class position that gets the bonus")
        bonus: float = option(10.0, "added to that class's score")

    def __init__(self, options, in_dim):
        super().__init__(options, in_dim)
        self.proj = torch.nn.Linear(in_dim, 16)

    def encode(self, x):
        return self.proj(x.mean(1))

    def scores(self, support, queries):
        s = super().scores(support, queries)
        return s + self.options.bonus * (torch.arange(s.shape[-1]) == self.options.position)
'''

TRAIN = ["--n-way", "2", "--episodes", "20", "--val-every", "10", "--val-episodes", "4", "--val-query", "2"]


def readme_head(tmp_path) -> Path:
    """The python block of docs/heads.md's "Write your own head" section, as the user would save it."""
    section = HEADS_PAGE.read_text().split("## Write your own head", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 30
    path = tmp_path / "my_heads.py"
    path.write_text(code)
    return path


def support_and_queries(tmp_path):
    sup = tmp_path / "support"
    for i in range(2):
        flat_video(sup / "blue" / f"b{i}.avi", 60 + 10 * i)
        flat_video(sup / "red" / f"r{i}.avi", 200 + 10 * i)
    return sup, [flat_video(tmp_path / "q" / "qb.avi", 75), flat_video(tmp_path / "q" / "qr.avi", 215)]


def test_favourite_head_scores_decide_eval_predict_and_report(trained, tmp_path):
    heads_file = tmp_path / "fav.py"
    heads_file.write_text(FAVOURITE)
    run = tmp_path / "runs" / "fav"
    r = cli("train", "--cache", str(trained / "c.h5"), "--out", str(run), "--head-file", str(heads_file),
            "--head", "favourite", "--head-opt", "position=1", "--head-opt", "bonus=5", *TRAIN)
    assert r.returncode == 0, r.stderr
    ck = torch.load(run / "seed-0" / "best.pt", weights_only=False)
    assert ck["head_options"] == {"position": 1, "bonus": 5.0} and ck["head_file"]["path"] == str(heads_file)
    metrics = tmp_path / "metrics"
    r = cli("eval", str(run), "--cache", str(trained / "c.h5"), "--n-way", "3", "--q-query", "2",
            "--episodes", "600", "--runs", "10", "--metrics", str(metrics / "fav.json"),
            "--accuracies", str(metrics / "fav.npy"))
    assert r.returncode == 0, r.stderr
    m = json.loads((metrics / "fav.json").read_text())
    assert m["episodes"] == 6000 and abs(m["accuracy"] - 1 / 3) < 1e-6 and m["ci95"] < 1e-6
    sup, queries = support_and_queries(tmp_path)
    r = cli("predict", "--checkpoint", str(run / "seed-0" / "best.pt"), "--support", str(sup), "--cache-dir", str(tmp_path / "pc"),
            "--json", *map(str, queries))
    assert r.returncode == 0, r.stderr
    assert [x["predicted"] for x in json.loads(r.stdout)["results"]] == ["red", "red"]   # position 1 of blue, red
    r = cli("report", "--metrics", str(metrics), "--runs", str(tmp_path / "runs"), "--cache", str(trained / "c.h5"),
            "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    assert "| fav | favourite |" in (tmp_path / "rep/results.md").read_text()
    assert "33.33" in (tmp_path / "rep/results.md").read_text()
    heads_file.write_text(FAVOURITE + "\n# edited after training\n")
    r = cli("eval", str(run / "seed-0" / "best.pt"), "--cache", str(trained / "c.h5"), "--n-way", "3", "--q-query", "2")
    assert r.returncode == 2 and "has changed since" in r.stderr and "Traceback" not in r.stderr


def test_readme_head_runs_end_to_end(trained, tmp_path):
    path = readme_head(tmp_path)
    r = cli("heads", "--head-file", str(path))
    assert r.returncode == 0 and "euclid" in r.stdout and "temperature" in r.stdout
    run = tmp_path / "runs" / "euclid"
    r = cli("train", "--cache", str(trained / "c.h5"), "--out", str(run), "--head-file", str(path), "--head", "euclid",
            "--head-opt", "dim=32", *TRAIN)
    assert r.returncode == 0, r.stderr
    r = cli("info", str(run / "seed-0" / "best.pt"))
    assert r.returncode == 0 and "dim=32" in r.stdout and str(path) in r.stdout
    assert "loss ce\n" in r.stdout      # the head's own loss, not circle
    metrics = tmp_path / "metrics"
    r = cli("eval", str(run), "--cache", str(trained / "c.h5"), "--n-way", "3", "--q-query", "2",
            "--episodes", "20", "--runs", "2", "--metrics", str(metrics / "euclid.json"))
    assert r.returncode == 0, r.stderr
    assert 0 <= json.loads((metrics / "euclid.json").read_text())["accuracy"] <= 1
    sup, queries = support_and_queries(tmp_path)
    r = cli("predict", "--checkpoint", str(run / "seed-0" / "best.pt"), "--support", str(sup), "--cache-dir", str(tmp_path / "pc"),
            "--json", *map(str, queries))
    assert r.returncode == 0, r.stderr
    scores = json.loads(r.stdout)["results"][0]["scores"]
    assert set(scores) == {"blue", "red"} and all(s <= 0 for s in scores.values())      # negative distances
    r = cli("report", "--metrics", str(metrics), "--runs", str(tmp_path / "runs"), "--cache", str(trained / "c.h5"),
            "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr and (tmp_path / "rep/similarity.png").exists()


def test_bad_inputs_end_in_one_line(trained, tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    cases = [
        (["train", "--cache", str(junk), "--out", str(tmp_path / "r")], "not a readable HDF5 file"),
        (["train", "--cache", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "r")], "does not exist"),
        (["train", "--cache", str(trained / "c.h5"), "--out", str(tmp_path / "r"), "--head-opt", "depth=3"],
         "unknown option 'depth'; its options: hidden (int, default 512)"),
        (["train", "--cache", str(trained / "c.h5"), "--out", str(tmp_path / "r"), "--head-opt", "hidden=big"],
         "option hidden='big' is not a valid int"),
        (["train", "--cache", str(trained / "c.h5"), "--out", str(tmp_path / "r"), "--head", "nope"], "unknown head"),
    ]
    old_style = tmp_path / "old_heads.py"      # a head written before heads were told the feature size
    old_style.write_text(FAVOURITE.replace("options, in_dim", "options=None").replace("(options, in_dim)", "(options)"))
    readme = readme_head(tmp_path)
    cases += [
        (["heads", "--head-file", str(old_style)], "__init__ must take (options, in_dim)"),
        (["train", "--cache", str(trained / "c.h5"), "--out", str(tmp_path / "r"), "--head-file", str(readme),
          "--head", "euclid", "--loss", "circle"], "circle loss"),
    ]
    newer = torch.load(trained / "run/seed-0/best.pt", weights_only=False)
    newer["format"] = 99
    torch.save(newer, tmp_path / "newer.pt")
    cases.append((["eval", str(tmp_path / "newer.pt"), "--cache", str(trained / "c.h5")], "format 99"))
    for args, message in cases:
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    r = cli("--debug", "train", "--cache", str(junk), "--out", str(tmp_path / "r"))
    assert r.returncode != 0 and "Traceback" in r.stderr
