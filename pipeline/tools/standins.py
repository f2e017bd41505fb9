"""Stand-ins for the matching study's release (jbertrand89/temporal_matching), in its exact formats:
per-video feature files and saved test episodes, small enough to import, train and score in minutes.

The real files are the user's to download (DATA_PREPARATION.md of that repository); these hold the
same layout, file types and tensor shapes, with features that carry a class signal and a temporal
pattern so that heads have something to learn: a video of one 16-frame clip saved as a 1-D tensor,
videos with fewer clips than a sequence, and class folders with non-ASCII names, as the real ones
can have. Episodes are drawn as their loader draws them (`study_positions`, their sampler).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fewshot.features import study_positions

PARTS = {"train": 10, "val": 5, "test": 6}       # classes per part (theirs: 64/12/24 or 70/10/21)
NAMES = ("ballet", "Ωmega_spin", "café_pour", "jump", "Kämpfen", "row", "skate", "surf", "swing", "throw",
         "climb", "dive", "juggle", "knit", "lift", "paddle", "ride", "ski", "type", "walk", "yoga")


def write_standins(out, dataset: str = "ucf101", videos_per_class: int = 12, dim: int = 512, episodes: int = 200,
                   shots=(1, 5), seed: int = 0, test_seed: int = 1) -> Path:
    """Writes <out>/features/<dataset>/<part>/<class>/<video>/{video_features.pth, clip_names.txt} and
    <out>/episodes/<dataset>/<dataset>_w5_s<K>/ (`episodes` saved 5-way K-shot test episodes, one query
    per class, numbered from 1 as theirs are). Returns <out>."""
    import torch

    out, rng = Path(out), np.random.default_rng(seed)
    names = iter(NAMES)
    videos = {}                                   # test class -> [(video dir, features (clips, D), clip frames)]
    for part, n_classes in PARTS.items():
        for c in range(n_classes):
            cls = next(names)
            centre, drift = rng.normal(size=dim), rng.normal(size=dim)     # the class and its motion
            for i in range(videos_per_class):
                vdir = out / "features" / dataset / part / cls / f"v_{part}_{c:02d}_{i:03d}"
                vdir.mkdir(parents=True, exist_ok=True)
                n = 1 if (c, i) == (0, 0) else int(rng.integers(3, 8)) if i == 1 else int(rng.integers(8, 30))
                t = np.linspace(-1, 1, n)[:, None]
                x = (centre + t * drift + 5.0 * rng.normal(size=(n, dim))).astype(np.float32)
                frames = [[f"{k + j + 1:08d}.jpg" for j in range(16)] for k in range(n)]   # their frame names
                torch.save(torch.from_numpy(x[0] if n == 1 else x), vdir / "video_features.pth")
                (vdir / "clip_names.txt").write_text("".join(",".join(f) + "\n" for f in frames), encoding="utf-8")
                if part == "test":
                    videos.setdefault(cls, []).append((vdir, x, frames))
    for k in shots:
        _write_episodes(out / "episodes" / dataset / f"{dataset}_w5_s{k}", videos, k, episodes, test_seed)
    return out


def _write_episodes(folder: Path, videos: dict, shot: int, count: int, seed: int, way: int = 5, clips: int = 8,
                    queries: int = 1) -> None:
    """Saved episodes as their run_matching.py writes them (test_episode_io.save_episode): the sets
    (members, clips, D), float labels 0..N-1, and per member one line of its clips' frame paths."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = sorted(videos)
    for e in range(1, count + 1):
        sets = {"support": ([], [], []), "target": ([], [], [])}
        for label, c in enumerate(np.array(classes)[rng.permutation(len(classes))[:way]]):
            picked = rng.permutation(len(videos[c]))[:shot + queries]
            for j, v in enumerate(picked):
                vdir, x, frames = videos[c][v]
                pos = study_positions(len(x), clips, rng)
                feats, labels, lines = sets["support" if j < shot else "target"]
                feats.append(x[pos])
                labels.append(label)
                lines.append(";".join(",".join(f"{vdir.name}/{f}" for f in frames[p]) for p in pos))
        for side, (feats, labels, lines) in sets.items():
            torch.save(torch.from_numpy(np.stack(feats)), folder / f"{side}_set_{e}.pth")
            torch.save(torch.FloatTensor(labels), folder / f"{side}_labels_{e}.pth")
            (folder / f"{side}_frame_names_{e}.txt").write_text("".join(f"{ln} \n" for ln in lines), encoding="utf-8")
