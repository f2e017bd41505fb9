from pathlib import Path

import cv2
import numpy as np
import pytest


def write_video(path: Path, n_frames: int, fourcc: str = "MJPG", size=(64, 48), fps=25) -> Path:
    """A video whose frame i is a flat grey of value 10 + 3 * i, so decoded frames identify themselves."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    assert w.isOpened()
    for i in range(n_frames):
        w.write(np.full((size[1], size[0], 3), 10 + 3 * i, np.uint8))
    w.release()
    return path


@pytest.fixture
def make_video(tmp_path):
    return lambda name, n, fourcc="MJPG", **kw: write_video(tmp_path / name, n, fourcc, **kw)
