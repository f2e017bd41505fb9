"""The DVC pipeline end to end on a tiny demo configuration, and `pipeline report` on fixtures."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))

TINY_RUN = dict(head="lstm", head_options=dict(hidden=16), loss="circle", gamma=32, margin=0.25, optimizer="head", episodes=20,
                k_shot=1, val_query=2, seed=0)


def tiny_params():
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"].update(videos_per_class=4, min_seconds=0.6, max_seconds=0.8)
    p["extract"].update(frames=4, resize=40, crop=32, precision="fp32", workers=0)
    p["eval"].update(q_query=2, episodes=5, runs=2)
    p["runs"] = {"lstm_circle": TINY_RUN, "mean": dict(TINY_RUN, head="mean", head_options={})}
    return p


def dvc(cwd, *args):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    r = subprocess.run([DVC, *args], cwd=cwd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


@pytest.mark.skipif(not Path(DVC).exists(), reason="dvc not installed in this environment")
def test_dvc_repro_runs_then_is_a_no_op_then_reruns_only_train(tmp_path):
    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    for code in ("pipeline", "stages"):
        shutil.copytree(ROOT / code, tmp_path / code, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    dvc(tmp_path, "init", "--no-scm", "-q")
    first = dvc(tmp_path, "repro")
    for stage in ("demo_data", "extract", "train@lstm_circle", "train@mean", "eval@lstm_circle", "eval@mean", "report",
                  "predict_demo"):
        assert f"Running stage '{stage}'" in first
    assert (tmp_path / "reports/index.md").exists() and (tmp_path / "metrics/lstm_circle.json").exists()
    assert len(json.loads((tmp_path / "predictions/demo.json").read_text())["results"]) == 12
    second = dvc(tmp_path, "repro")
    assert "Running stage" not in second and "up to date" in second
    # extracted again from scratch: lzf's bytes may differ, the content does not, so nothing after it re-runs
    for f in ("cache/demo.h5", "cache/demo.h5.json"):
        (tmp_path / f).unlink()
    again = dvc(tmp_path, "repro")
    assert "Running stage 'extract'" in again and "Running stage 'train@" not in again
    p = tiny_params()
    p["runs"]["lstm_circle"]["head_options"]["hidden"] = 8
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    third = dvc(tmp_path, "repro")
    assert "Running stage 'train@lstm_circle'" in third and "Running stage 'eval@lstm_circle'" in third
    assert "Running stage 'extract'" not in third and "Running stage 'train@mean'" not in third
    shown = dvc(tmp_path, "metrics", "show", "--json")
    assert "accuracy" in shown and "ci95" in shown


def fake_run(metrics, runs, name, head, loss, acc, gamma=128.0, margin=0.4, seed=0, seeds=2, episodes="e0"):
    """Metrics of a run of `seeds` training seeds on 40 shared episodes, as `pipeline eval` writes them."""
    from pipeline.fewshot.metrics import over_seeds
    rng = np.random.default_rng(seed)
    per = (rng.random((seeds, 40)) < acc).astype(float)
    cfg = dict(head=head, head_options={}, loss=loss, gamma=gamma, margin=margin, n_way=5, k_shot=1, seed=0)
    m = dict(over_seeds(per), episodes=40, runs=2, run="", head=head, head_options={}, loss=loss, n_way=5, k_shot=1,
             q_query=15, part="test", seed=0, train_config=cfg, episodes_digest=episodes,
             per_seed=[dict(seed=s, val=0.5, test=float(per[s].mean())) for s in range(seeds)])
    m["run"] = name
    (metrics / f"{name}.json").write_text(json.dumps(m))
    np.save(metrics / f"{name}.npy", per)
    (runs / name / "seed-0").mkdir(parents=True)
    (runs / name / "seed-0" / "curve.csv").write_text("episode,loss,val_accuracy\n10,2.0,0.5\n20,1.0,0.7\n")
    return m, per


def test_report_on_metrics_fixtures(tmp_path):
    from pipeline.fewshot.metrics import paired
    from pipeline.tools.report import report
    metrics, runs = tmp_path / "metrics", tmp_path / "runs"
    metrics.mkdir()
    best, best_acc = fake_run(metrics, runs, "a_best", "lstm", "circle", 0.9)
    other, other_acc = fake_run(metrics, runs, "b_ce", "lstm", "ce", 0.6, seed=1)
    for i, g in enumerate((32, 64, 256)):
        fake_run(metrics, runs, f"g{g}", "lstm", "circle", 0.5, gamma=g, seed=10 + i)
    fake_run(metrics, runs, "c_elsewhere", "mean", "ce", 0.5, seed=20, episodes="e1")   # another cache's episodes
    written = report(metrics, runs, None, tmp_path / "out")
    names = {p.name for p in written}
    assert {"results.md", "results.csv", "curves.png", "sweep_gamma.png", "index.md"} <= names
    assert all(p.exists() and p.stat().st_size > 0 for p in written)
    import csv
    rows = {r["run"]: r for r in csv.DictReader(open(tmp_path / "out/results.csv"))}
    assert float(rows["a_best"]["accuracy"]) == round(100 * best["accuracy"], 2)
    assert float(rows["b_ce"]["ci95"]) == round(100 * other["ci95"], 2)
    assert rows["a_best"]["vs_best"] == "best" and rows["b_ce"]["vs_best"] == "a_best"
    d = paired(other_acc, best_acc)
    assert float(rows["b_ce"]["diff"]) == round(100 * d["diff"], 2) and d["seeds"] == 2
    assert rows["c_elsewhere"]["diff"] == "" and rows["c_elsewhere"]["p_value"] == ""
    md = (tmp_path / "out/results.md").read_text()
    assert "not compared with a_best: scored on other episodes (e1 vs e0)" in md
    assert f"{100 * d['diff']:+.2f} ± {100 * d['ci95']:.2f}" in md and "training seeds and test episodes" in md
    assert "p = 0 " not in md and "p=0" not in md
    assert "[sweep_gamma.png](sweep_gamma.png)" in (tmp_path / "out/index.md").read_text()
