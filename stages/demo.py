"""`make demo`: the main job on the embedded demo dataset, end to end through the CLI.

demo-data -> scan -> extract (random-init MFNet, bf16) -> train lstm+circle, lstm+ce, mean ->
eval all three on the same fixed test episodes (paper protocol: 5-way 1-shot, 15 queries,
600 x 10 episodes) -> predict held-out videos of the test classes from K examples per class.
Every step is idempotent: a second `make demo` reuses what exists.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DATA = "data/demo"
CACHE = "cache/demo.h5"
RUNS = "runs/demo"
HEADS = [("lstm_circle", ["--head", "lstm", "--loss", "circle"]),
         ("lstm_ce", ["--head", "lstm", "--loss", "ce"]),
         ("mean", ["--head", "mean"])]


def run(*args: str, capture: bool = False) -> str:
    print("\n$ pipeline " + " ".join(args), flush=True)
    r = subprocess.run([sys.executable, "-m", "pipeline", *args], check=True, text=True,
                       stdout=subprocess.PIPE if capture else None)
    return r.stdout


def predict_demo(k_shot: int = 5, queries_per_class: int = 2) -> None:
    """Support = the last K videos of each test class (links), queries = its first videos."""
    root = Path(DATA)
    support = Path("data/demo_predict/support")
    queries = []
    for c in (root / "splits" / "test_classes.txt").read_text().split():
        files = sorted((root / c).glob("*.avi"))
        (support / c).mkdir(parents=True, exist_ok=True)
        for f in files[-k_shot:]:
            link = support / c / f.name
            if not link.exists():
                os.symlink(os.path.relpath(f, link.parent), link)
        queries += files[:queries_per_class]
    out = json.loads(run("predict", "--checkpoint", f"{RUNS}/lstm_circle/best.pt", "--support", str(support),
                         "--json", *map(str, queries), capture=True))
    right = 0
    print(f"{'query':34s} {'true class':18s} {'predicted':18s} margin")
    for r in out["results"]:
        true = Path(r["query"]).parent.name
        right += r["predicted"] == true
        print(f"{Path(r['query']).name:34s} {true:18s} {r['predicted']:18s} {r['margin']:.3f}")
    print(f"{right}/{len(out['results'])} correct ({k_shot} examples per class; {out['decoded']} video(s) decoded, "
          f"{out['reused_support']} support videos reused from the cache)")


def main() -> None:
    run("demo-data", "--out", DATA, "--seed", "0")
    run("scan", "--root", DATA, "--split", f"{DATA}/splits")
    run("extract", "--root", DATA, "--split", "demo", "--out", CACHE, "--precision", "bf16",
        "--batch-size", "8", "--workers", "2")
    for name, args in HEADS:
        run("train", "--cache", CACHE, "--out", f"{RUNS}/{name}", *args)
    run("eval", *[f"{RUNS}/{name}/best.pt" for name, _ in HEADS], "--cache", CACHE, "--metrics", f"{RUNS}/metrics")
    predict_demo()


if __name__ == "__main__":
    main()
