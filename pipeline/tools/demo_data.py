"""The embedded demo dataset: short synthetic "actions" written as real video files.

Each class is an ordered sequence of 2-3 atomic steps. Every step has its own shape, colour and
dynamics (spinning, pulsing, flickering, ...), so even a randomly initialised 3D CNN sees them as
different; several classes are the same steps in the opposite order, so only an order-aware model
can tell those pairs apart. Within a class every video varies: step durations, positions, sizes,
speeds, colours, background texture, camera jitter, noise, and now and then a skipped step, so
videos of one class are temporally misaligned like real actions.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

from ..errors import ConfigError, PipelineError
from ..files import atomic_path


class DemoDataError(PipelineError, FileExistsError):
    """The output folder holds a demo dataset made with other settings."""

WIDTH, HEIGHT, FPS = 320, 240, 25
VERSION = 2  # bump when the generator's output changes

# Reversed pairs: both orders become classes. Singles: one order only.
# Validation holds three reversed pairs like test, and eight classes, so that 5-way validation
# episodes vary and select checkpoints on what the test measures: telling order apart.
PAIRS = {
    "train": [("spin", "pulse"), ("slide", "bounce", "hue")],
    "val": [("flicker", "slide"), ("hue", "spin", "stripes"), ("stripes", "shake")],
    "test": [("pulse", "flicker"), ("bounce", "stripes"), ("shake", "hue", "slide")],
}
SINGLES = {
    "train": [("spin", "flicker"), ("pulse", "slide"), ("bounce", "shake"),
              ("slide", "spin"), ("shake", "flicker", "bounce"), ("stripes", "hue")],
    "val": [("bounce", "spin", "flicker"), ("hue", "stripes", "pulse")],
    "test": [],
}


def class_steps() -> dict[str, dict[str, tuple[str, ...]]]:
    """part -> {class name: steps in order}."""
    out = {}
    for part in ("train", "val", "test"):
        seqs = [s for p in PAIRS[part] for s in (p, p[::-1])] + SINGLES[part]
        out[part] = {"_".join(s): s for s in seqs}
    return out


# ---------------------------------------------------------------- atomic steps
# Each draws onto a BGR frame; `k` is the frame number inside the step, `p` per-video parameters.

def _star(cx, cy, r, n=5):
    a = np.arange(2 * n) * math.pi / n - math.pi / 2
    rad = np.where(np.arange(2 * n) % 2 == 0, r, r * 0.45)
    return np.stack([cx + rad * np.cos(a), cy + rad * np.sin(a)], 1).astype(np.int32)


def spin(img, k, p):
    a = p["phase"] + p["speed"] * k * 0.25
    s = 28 * p["size"]
    pts = [(p["x"] + s * math.cos(a + i * math.pi / 2), p["y"] + s * math.sin(a + i * math.pi / 2)) for i in range(4)]
    cv2.fillPoly(img, [np.array(pts, np.int32)], p["tint"](40, 40, 220))


def pulse(img, k, p):
    r = 22 * p["size"] * (1 + 0.5 * math.sin(p["phase"] + p["speed"] * k * 0.6))
    cv2.circle(img, (int(p["x"]), int(p["y"])), int(r), p["tint"](60, 210, 60), -1)


def flicker(img, k, p):
    if (k // max(1, int(4 / p["speed"]))) % 2 == 0:
        s = 32 * p["size"]
        pts = np.array([(p["x"], p["y"] - s), (p["x"] - s, p["y"] + s * 0.8), (p["x"] + s, p["y"] + s * 0.8)], np.int32)
        cv2.fillPoly(img, [pts], p["tint"](230, 90, 30))


def slide(img, k, p):
    travel = WIDTH - 120
    pos = (p["phase"] * 40 + p["speed"] * 6 * k) % (2 * travel)
    x = 40 + (pos if pos < travel else 2 * travel - pos)
    if p["mirror"]:
        x = WIDTH - x
    h = 14 * p["size"]
    cv2.rectangle(img, (int(x - 30), int(p["y"] - h)), (int(x + 30), int(p["y"] + h)), p["tint"](30, 220, 230), -1)


def bounce(img, k, p):
    y = p["y"] + 30 - 70 * abs(math.sin(p["phase"] + p["speed"] * k * 0.2))
    cv2.circle(img, (int(p["x"]), int(y)), int(16 * p["size"]), p["tint"](200, 40, 200), -1)


def hue(img, k, p):
    h = int(p["phase"] * 30 + p["speed"] * 9 * k) % 180
    bgr = cv2.cvtColor(np.uint8([[[h, 230, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    cv2.fillPoly(img, [_star(p["x"], p["y"], 34 * p["size"])], tuple(int(c) for c in bgr))


def stripes(img, k, p):
    s = int(40 * p["size"])
    x0, y0 = int(p["x"]) - s, int(p["y"]) - s
    cv2.rectangle(img, (x0, y0), (x0 + 2 * s, y0 + 2 * s), (40, 40, 40), -1)
    off = int(p["phase"] * 10 + p["speed"] * 3 * k) % 12
    for d in range(-2 * s + off, 2 * s, 12):
        cv2.line(img, (x0 + max(d, 0), y0 + max(-d, 0)), (x0 + min(2 * s, 2 * s + d), y0 + min(2 * s, 2 * s - d)),
                 p["tint"](230, 230, 40), 3)


def shake(img, k, p):
    rng = np.random.default_rng(int(p["phase"] * 1000) + k)
    x, y = p["x"] + rng.integers(-7, 8), p["y"] + rng.integers(-7, 8)
    s, w = int(30 * p["size"]), int(8 * p["size"])
    c = p["tint"](20, 140, 255)
    cv2.rectangle(img, (int(x - s), int(y - w)), (int(x + s), int(y + w)), c, -1)
    cv2.rectangle(img, (int(x - w), int(y - s)), (int(x + w), int(y + s)), c, -1)


STEPS = {f.__name__: f for f in (spin, pulse, flicker, slide, bounce, hue, stripes, shake)}


# ---------------------------------------------------------------- one video

def render_video(steps: tuple[str, ...], rng: np.random.Generator, seconds: tuple[float, float]) -> list[np.ndarray]:
    """The BGR frames of one video of the class made of `steps`."""
    n = int(rng.uniform(*seconds) * FPS)
    steps = list(steps)
    if len(steps) == 3 and rng.random() < 0.15:  # a performer skipping a step
        del steps[int(rng.integers(3))]
    weights = rng.uniform(0.6, 1.4, len(steps))
    bounds = np.concatenate([[0], np.cumsum(weights / weights.sum())]) * n
    jitter = 8
    tex = rng.integers(0, 90, (6, 8, 3)).astype(np.uint8)
    bg = cv2.resize(tex, (WIDTH + 2 * jitter, HEIGHT + 2 * jitter), interpolation=cv2.INTER_CUBIC)
    bg = cv2.add(bg, rng.integers(0, 25, (HEIGHT + 2 * jitter, WIDTH + 2 * jitter, 3), dtype=np.uint8))
    noise = [rng.normal(0, rng.uniform(2, 5), (HEIGHT, WIDTH, 3)).astype(np.int16) for _ in range(6)]
    shift = rng.integers(-30, 31, 3)

    def tint(b, g, r):
        return tuple(int(np.clip(v + s, 0, 255)) for v, s in zip((b, g, r), shift))

    params = [dict(x=rng.uniform(90, WIDTH - 90), y=rng.uniform(80, HEIGHT - 70), size=rng.uniform(0.8, 1.3),
                   speed=rng.uniform(0.7, 1.4), phase=rng.uniform(0, 6.28), mirror=bool(rng.random() < 0.5),
                   tint=tint) for _ in steps]
    cam = np.zeros(2)
    frames = []
    for i in range(n):
        s = min(int(np.searchsorted(bounds, i, side="right")) - 1, len(steps) - 1)
        cam = np.clip(cam + rng.normal(0, 1.2, 2), -jitter, jitter)
        dx, dy = int(cam[0]) + jitter, int(cam[1]) + jitter
        img = bg[dy:dy + HEIGHT, dx:dx + WIDTH].copy()
        STEPS[steps[s]](img, i - int(bounds[s]), params[s])
        img = np.clip(img.astype(np.int16) + noise[i % len(noise)], 0, 255).astype(np.uint8)
        frames.append(img)
    return frames


def write_video(path: Path, frames: list[np.ndarray], fourcc: str = "XVID") -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise RuntimeError(f"{path}: OpenCV cannot write {fourcc} video here")
    for f in frames:
        writer.write(f)
    writer.release()


def _write_class(out: Path, name: str, steps, label: int, seed: int, videos: int, seconds) -> int:
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    for v in range(videos):
        path = d / f"{name}_{v:03d}.avi"
        if not path.exists():
            frames = render_video(steps, np.random.default_rng([seed, label, v]), seconds)
            with atomic_path(path, suffix=".avi") as tmp:  # a killed run leaves no half-written video
                write_video(tmp, frames)
    return videos


def generate(out, seed: int = 0, videos_per_class: int = 20, seconds: tuple[float, float] = (2.0, 6.0),
             jobs: int = 2, progress: bool = True) -> dict:
    """Write the demo dataset to `out` (idempotent: existing videos of the same settings are kept)."""
    from joblib import Parallel, delayed
    from tqdm import tqdm

    if not 0 < seconds[0] <= seconds[1]:
        raise ConfigError(f"demo-data: need 0 < --min-seconds <= --max-seconds, got {seconds[0]} and {seconds[1]}")
    out = Path(out)
    manifest = dict(version=VERSION, seed=seed, videos_per_class=videos_per_class, seconds=list(seconds),
                    width=WIDTH, height=HEIGHT, fps=FPS, classes={p: {c: list(s) for c, s in cs.items()}
                                                                  for p, cs in class_steps().items()})
    mfile = out / "manifest.json"
    if mfile.exists():
        old = json.loads(mfile.read_text())
        if old != manifest:
            raise DemoDataError(f"{out} holds a demo dataset made with other settings ({mfile}); "
                                  "remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    mfile.write_text(json.dumps(manifest, indent=1))
    classes = [(c, s) for cs in class_steps().values() for c, s in cs.items()]
    tasks = (delayed(_write_class)(out, c, s, i, seed, videos_per_class, seconds) for i, (c, s) in enumerate(classes))
    bar = tqdm(total=len(classes), unit="class", disable=not progress, desc="demo videos")
    for _ in Parallel(n_jobs=jobs, return_as="generator_unordered")(tasks):
        bar.update()
    bar.close()
    split_dir = out / "splits"
    split_dir.mkdir(exist_ok=True)
    for part, cs in class_steps().items():
        (split_dir / f"{part}_classes.txt").write_text("".join(c + "\n" for c in cs))
    return manifest
