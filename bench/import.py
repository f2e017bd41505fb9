"""Import speed of per-video feature files (`pipeline import-features`), on stand-ins of the matching
study's sizes: 512-d R(2+1)D vectors, one per 16-frame clip at every temporal position.

    python bench/import.py [--videos 3000] [--workers 1 2] [--eval diag chamfer ...] [--episodes 10000]

Clip counts per video: SSv2 videos of about 45 frames (30 clips), UCF101 of about 7 s at 25 fps (170
clips). Files are written with torch.save into a temporary folder and read back warm (from the page
cache: the figure is the importer's own, not the disk's). Prints videos/s and MB/s per profile and
worker count, and the memory that SSv2's train part takes in training, computed from its shapes.
With --eval, the time to score `--episodes` saved 5-way episodes (1 query per class, as theirs) of
fixed 8-clip sequences (`pipeline eval --episodes-file`) per head at its study defaults, on a
UCF101-sized test part (2,745 videos of 30 clips), 1-shot and 5-shot.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.importing import import_features  # noqa: E402

PROFILES = {"ssv2": 30, "ucf101": 170}          # mean clips per video
SSV2_TRAIN_VIDEOS = 67013                       # TSL's somethingv2 train.list (64 classes)


def write(root: Path, videos: int, clips: int, rng) -> int:
    total = 0
    for i in range(videos):
        part = ("train", "val", "test")[i % 3]
        d = root / part / f"class{i % 30:02d}" / f"v{i:06d}"
        d.mkdir(parents=True)
        n = max(1, int(rng.normal(clips, clips / 4)))
        torch.save(torch.from_numpy(rng.normal(size=(n, 512)).astype(np.float32)), d / "video_features.pth")
        (d / "clip_names.txt").write_text("".join(f"{k + 1:08d}.jpg\n" for k in range(n)))
        total += (d / "video_features.pth").stat().st_size
    return total


def eval_speed(heads: list[str], episodes: int) -> None:
    from pipeline.fewshot import heads as registry
    from pipeline.fewshot.evaluate import sequence_accuracies
    from pipeline.fewshot.features import SplitFeatures
    rng = np.random.default_rng(0)
    videos, clips = 2745, 30
    x = rng.normal(size=(videos, 1, clips, 512)).astype(np.float32)
    feats = SplitFeatures.from_sequences(np.array([f"v{i}" for i in range(videos)]), np.zeros(videos, str), x)
    torch.set_num_threads(2)
    for name in heads:
        head = registry.build(name, {"clips": 8}, 512).eval()
        for k in (1, 5):
            members = rng.integers(0, videos, size=(episodes, 5, k + 1))
            positions = np.sort(rng.integers(0, clips, size=(episodes, 5, k + 1, 8)), axis=-1)
            t = time.perf_counter()
            sequence_accuracies(head, feats, members, positions, k)
            print(f"  eval of {episodes:,} saved 5-way {k}-shot episodes, {name}: {time.perf_counter() - t:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=3000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--eval", nargs="*", default=[], help="heads whose scoring of saved episodes is timed")
    ap.add_argument("--episodes", type=int, default=10000)
    a = ap.parse_args()
    if a.eval:
        eval_speed(a.eval, a.episodes)
        return
    rng = np.random.default_rng(0)
    print(f"import of {a.videos} stand-in videos per profile (warm page cache), best of 2")
    for name, clips in PROFILES.items():
        with tempfile.TemporaryDirectory(dir=".") as tmp:
            size = write(Path(tmp) / "f", a.videos, clips, rng)
            for w in a.workers:
                best = float("inf")
                for k in range(2):
                    out = Path(tmp) / f"c{w}{k}.h5"
                    t = time.perf_counter()
                    import_features(Path(tmp) / "f", out, "temporal_matching", "bench", workers=w, progress=False)
                    best = min(best, time.perf_counter() - t)
                    out.unlink()
                print(f"  {name:6s} ({clips} clips, {size / a.videos / 1e3:.0f} KB a file), {w} worker(s): "
                      f"{a.videos / best:,.0f} videos/s, {size / best / 1e6:,.0f} MB/s")
    gb16 = SSV2_TRAIN_VIDEOS * PROFILES["ssv2"] * 512 * 2 / 1e9
    print(f"SSv2 train part in training memory: {SSV2_TRAIN_VIDEOS:,} videos x ~{PROFILES['ssv2']} clips x 512: "
          f"{gb16:.2f} GB as float16 (--features-dtype float16), {2 * gb16:.2f} GB as float32")


if __name__ == "__main__":
    main()
