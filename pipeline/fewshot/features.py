"""Loading the cached features of one split part into memory for the heads.

Memory: pooled heads hold (videos, views, T, 768) float32 = 9 KB per video-view at T=3
(UCF101 train, 1 view: 84 MB). Map heads hold the clip-mean map (views, 768, 8, 4, 4) float16 =
192 KB per video-view (UCF101 train, 1 view: 1.8 GB), read once from HDF5 in contiguous row blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PipelineError
from ..store import FeatureStore


class FeatureError(PipelineError):
    pass


@dataclass
class SplitFeatures:
    ids: np.ndarray            # (n,) "Class/stem"
    classes: np.ndarray        # (n,) class names
    x: np.ndarray              # pooled (n, V, T, 768) float32 | maps (n, V, 768, t, h, w) float16
    views: int

    def by_class(self) -> dict[str, np.ndarray]:
        return {c: np.flatnonzero(self.classes == c) for c in np.unique(self.classes)}


def load(store: FeatureStore, part: str, consumes: str, views: int | None = None, block: int = 256) -> SplitFeatures:
    """The ok videos of `part`; all views by default, or only the first `views`."""
    v = store.videos
    sel = np.flatnonzero((v["part"] == part) & (v["status"] == "ok"))
    if len(sel) == 0:
        raise FeatureError(f"{store.path}: no extracted videos in part {part!r}")
    clips, nviews = np.unique(v["n_clips"][sel]), int(v["n_views"][sel].min())
    if len(clips) != 1:
        raise FeatureError(f"{store.path}: videos of {part} have different clip counts {clips.tolist()[:5]}; "
                           "the heads need a fixed T (extract with --sampling segments)")
    t = int(clips[0])
    nv = nviews if views is None else min(views, nviews)
    first = v["first_row"][sel]
    if consumes == "pooled":
        pooled = store.f["pooled"][:]
        rows = first[:, None, None] + (np.arange(nv)[:, None] * t + np.arange(t)[None, :])[None]
        x = pooled[rows]                               # (n, V, T, 768)
    elif consumes == "maps":
        feats = store.f["features"]
        x = np.empty((len(sel), nv, *feats.shape[1:]), np.float16)
        for start in range(0, len(sel), block):
            chunk = sel[start:start + block]
            lo = int(v["first_row"][chunk[0]])
            hi = int(v["first_row"][chunk[-1]] + v["n_clips"][chunk[-1]] * v["n_views"][chunk[-1]])
            data = feats[lo:hi]                        # contiguous read of this block's rows
            for j, vid in enumerate(chunk):
                r = int(v["first_row"][vid]) - lo
                for view in range(nv):
                    x[start + j, view] = data[r + view * t:r + (view + 1) * t].astype(np.float32).mean(0)
    else:
        raise ValueError(f"consumes must be 'pooled' or 'maps', got {consumes!r}")
    return SplitFeatures(v["id"][sel], v["class_name"][sel], x, nv)
