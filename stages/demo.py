"""`make demo`: the main job on the embedded demo dataset."""
from __future__ import annotations

import subprocess
import sys

DATA = "data/demo"


def run(*args: str) -> None:
    cmd = [sys.executable, "-m", "pipeline", *args]
    print("$ pipeline " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    run("demo-data", "--out", DATA, "--seed", "0")
    run("scan", "--root", DATA, "--split", f"{DATA}/splits", "--probe")


if __name__ == "__main__":
    main()
