import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest


def write_video(path: Path, n_frames: int, fourcc: str = "MJPG", size=(64, 48), fps=25, start: int = 10) -> Path:
    """A video whose frame i is a flat grey of value start + 3 * i, so decoded frames identify themselves
    (and videos with another `start` are other files: extract refuses byte-identical files across parts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    assert w.isOpened()
    for i in range(n_frames):
        w.write(np.full((size[1], size[0], 3), start + 3 * i, np.uint8))
    w.release()
    return path


@pytest.fixture
def make_video(tmp_path):
    return lambda name, n, fourcc="MJPG", **kw: write_video(tmp_path / name, n, fourcc, **kw)


SMALL = ["--clips", "2", "--frames", "4", "--resize", "40", "--crop", "32", "--workers", "0"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A mean head (no training needed) over a tiny cache made with small extraction settings."""
    d = tmp_path_factory.mktemp("p")
    for c in "abcdefgh":
        for i in range(3):
            write_video(d / "data" / c / f"{c}{i}.avi", 12 + i, size=(48, 40), start=10 + 5 * (ord(c) - 97))
    split = d / "split"
    split.mkdir()
    for part, cs in (("train", "abc"), ("val", "de"), ("test", "fgh")):
        (split / f"{part}_classes.txt").write_text("\n".join(cs))
    assert cli("extract", "--root", str(d / "data"), "--split", str(split), "--out", str(d / "c.h5"),
               *SMALL).returncode == 0
    r = cli("train", "--cache", str(d / "c.h5"), "--out", str(d / "run"), "--head", "mean", "--n-way", "2",
            "--val-episodes", "2", "--val-query", "2")
    assert r.returncode == 0, r.stderr
    return d


def flat_video(path, level, n=14):
    import cv2
    import numpy as np
    path.parent.mkdir(parents=True, exist_ok=True)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (48, 40))
    rng = np.random.default_rng(level)
    for _ in range(n):
        img = np.zeros((40, 48, 3), np.uint8)
        img[..., 0 if level < 100 else 2] = level + rng.integers(0, 10)     # blue-ish vs red-ish
        w.write(img)
    w.release()
    return path
