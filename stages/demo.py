"""`make demo`: the main job on the embedded demo dataset, end to end through the CLI.

demo-data -> scan -> extract (random-init MFNet, bf16) -> train lstm+circle, lstm+ce, mean ->
eval all three on the same fixed test episodes (paper protocol: 5-way 1-shot, 15 queries,
600 x 10 episodes). Every step is idempotent: a second `make demo` reuses what exists.
"""
from __future__ import annotations

import subprocess
import sys

DATA = "data/demo"
CACHE = "cache/demo.h5"
RUNS = "runs/demo"
HEADS = [("lstm_circle", ["--head", "lstm", "--loss", "circle"]),
         ("lstm_ce", ["--head", "lstm", "--loss", "ce"]),
         ("mean", ["--head", "mean"])]


def run(*args: str) -> None:
    print("\n$ pipeline " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "pipeline", *args], check=True)


def main() -> None:
    run("demo-data", "--out", DATA, "--seed", "0")
    run("scan", "--root", DATA, "--split", f"{DATA}/splits")
    run("extract", "--root", DATA, "--split", f"{DATA}/splits", "--out", CACHE, "--precision", "bf16",
        "--batch-size", "8", "--workers", "1")
    for name, args in HEADS:
        run("train", "--cache", CACHE, "--out", f"{RUNS}/{name}", *args)
    run("eval", *[f"{RUNS}/{name}/best.pt" for name, _ in HEADS], "--cache", CACHE, "--metrics", f"{RUNS}/metrics")


if __name__ == "__main__":
    main()
