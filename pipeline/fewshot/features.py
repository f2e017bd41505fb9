"""Loading the cached features of one split part into memory for the heads, and the clip sequences
the heads read.

Pooled heads get their part's clip vectors, (rows, 768) float32, 3 KB per clip (UCF101 train at
T=3, 1 view: 27,462 clips, 84 MB; dense, stride 16, about 5x that), and read sequences of T clips
from them: one clip from each of T equal segments of a video's clips, drawn at random in training
(temporal augmentation from one cache) and the middle one in evaluation; a video with fewer clips
than T repeats clips in order. A cache with exactly T clips per video gives exactly its clips.
Heads that read the per-step view (option per_step) get each clip's 8 temporal positions, (rows,
8, 768) float16, 12 KB per clip (UCF101 train at T=8 segments: 73k clips, 0.9 GB).
Map heads hold the clip-mean map (views, 768, 8, 4, 4) float16 = 192 KB per video-view (UCF101
train, 1 view: 1.8 GB), read once from HDF5 in contiguous row blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ..errors import PipelineError
from ..store import FeatureStore


class FeatureError(PipelineError):
    pass


class NonFinite(FeatureError):
    """Videos whose features hold a NaN or infinity (`ids`)."""

    def __init__(self, message: str, ids):
        super().__init__(message)
        self.ids = list(ids)


@dataclass
class SplitFeatures:
    ids: np.ndarray            # (n,) "Class/stem"
    classes: np.ndarray        # (n,) class names
    x: np.ndarray              # pooled (rows, 768) float32 clip vectors | steps (rows, t, 768) float16 |
                               # maps (n, V, 768, t, h, w) float16
    views: int
    first: np.ndarray | None = None   # pooled: (n, V) row in x of each video-view's first clip
    count: np.ndarray | None = None   # pooled: (n,) clips per video
    dropped: tuple = ()               # videos left out for non-finite values (load(drop_nonfinite=True))

    @classmethod
    def from_sequences(cls, ids, classes, seqs: np.ndarray) -> "SplitFeatures":
        """Pooled features from equal-length sequences (n, V, T, 768)."""
        n, v, t = seqs.shape[:3]
        return cls(ids, classes, seqs.reshape(-1, seqs.shape[-1]), v, np.arange(n * v).reshape(n, v) * t,
                   np.full(n, t))

    @property
    def feature_size(self) -> int:
        """D, the size of a step's feature vector (maps: their channels)."""
        return int(self.x.shape[2] if self.first is None else self.x.shape[-1])

    def by_class(self) -> dict[str, np.ndarray]:
        return {c: np.flatnonzero(self.classes == c) for c in np.unique(self.classes)}

    def inputs(self, videos, views=None, clips: int | None = None, rng: np.random.Generator | None = None,
               sampler: str = "segments"):
        """What a head reads of `videos` (B,) in `views` (B,; default view 0): maps (B, 768, t, h, w), or
        clip sequences (B, T, 768) with T = `clips` (None: the cache's own T, which must then be the same
        for every video), random within segments when `rng` is given (`sampler`: SAMPLERS); from the
        per-step view, each clip's t positions in a row: (B, T * t, 768)."""
        videos = np.asarray(videos)
        views = np.zeros(len(videos), int) if views is None else views
        if self.first is None:
            return self.x[videos, views]
        count = self.count[videos]
        if clips is None:
            if (count != count[0]).any():
                raise FeatureError(f"videos have {count.min()} to {count.max()} clips (a dense cache): give the "
                                   "head a sequence length, --head-opt clips=T")
            clips = int(count[0])
        picks = SAMPLERS[sampler](count, clips, rng) if rng is not None else segment_picks(count, clips)
        seq = self.x[self.first[videos, views][:, None] + picks]                       # (B, T, [t,] 768)
        return seq.reshape(len(videos), -1, seq.shape[-1])


def segment_picks(count: np.ndarray, clips: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """(B,) clip counts -> (B, T) clip positions: one from each of T equal segments [lo, hi), the middle
    one, or a random one with `rng` (no draw at all when every segment holds one clip)."""
    t = np.arange(clips)[None]
    lo = t * count[:, None] // clips
    hi = np.maximum((t + 1) * count[:, None] // clips, lo + 1)
    if rng is None or (hi - lo == 1).all():
        return (lo + hi - 1) // 2
    return lo + (rng.random(lo.shape) * (hi - lo)).astype(np.int64)


def study_positions(count: int, clips: int, rng: np.random.Generator) -> list[int]:
    """The clips the matching study's loader reads of a video of `count` clips (temporal_matching,
    VideoFeatureReader.load_video_features): one drawn from each of `clips` segments bounded by
    ceil(linspace(0, count, clips + 1)); a video of `clips` or fewer clips gives all of them, its last
    repeated (no draw)."""
    if count <= clips:
        return list(range(count)) + [count - 1] * (clips - count)
    b = np.linspace(0, count, clips + 1)
    return [int(rng.choice(range(math.ceil(b[i]), math.ceil(b[i + 1])))) for i in range(clips)]


def study_picks(count: np.ndarray, clips: int, rng: np.random.Generator) -> np.ndarray:
    """(B,) clip counts -> (B, T) positions, drawn as the matching study's loader draws them."""
    return np.array([study_positions(int(n), clips, rng) for n in count], dtype=np.int64)


# How training draws a video's T clips: ours (segments by floor division, a short video's clips spread
# in order) or the matching study's (a short video padded with its last clip)
SAMPLERS = {"segments": segment_picks, "study": study_picks}


def load(store: FeatureStore, part: str, view: str, views: int | None = None, block: int = 256,
         drop_nonfinite: bool = False, pooled_dtype: str = "float32") -> SplitFeatures:
    """The ok videos of `part` in one of the cache's views ("pooled", "steps" or "maps"); all crop
    views by default, or only the first `views`; pooled vectors held as `pooled_dtype` (float16: half
    the memory). A video with a NaN or infinity is an error naming it, or with `drop_nonfinite` left
    out (and listed in `dropped`)."""
    try:
        return _load(store, part, view, views, block, (), pooled_dtype)
    except NonFinite as e:
        if not drop_nonfinite:
            raise
        return replace(_load(store, part, view, views, block, e.ids, pooled_dtype), dropped=tuple(e.ids))


def _load(store: FeatureStore, part: str, view: str, views: int | None, block: int, exclude,
          pooled_dtype: str) -> SplitFeatures:
    v = store.videos
    sel = np.flatnonzero((v["part"] == part) & (v["status"] == "ok") & ~np.isin(v["id"], list(exclude)))
    if len(sel) == 0:
        raise FeatureError(f"{store.path}: no extracted videos in part {part!r}")
    nv = int(v["n_views"][sel].min()) if views is None else min(views, int(v["n_views"][sel].min()))
    count = v["n_clips"][sel].astype(np.int64)
    if view in ("pooled", "steps"):
        starts = (v["first_row"][sel][:, None] + np.arange(nv)[None, :] * count[:, None]).ravel()   # cache rows
        lengths = np.repeat(count, nv)
        ds = store.f["pooled"] if view == "pooled" else store.steps()
        x = read_runs(ds, starts, lengths, pooled_dtype if view == "pooled" else None)
        first = np.concatenate([[0], np.cumsum(lengths)[:-1]]).reshape(len(sel), nv)
        rows_ok = np.concatenate([np.isfinite(x[lo:lo + 65536].reshape(-1, x[0].size)).all(1)    # in blocks: no
                                  for lo in range(0, len(x), 65536)])                          # full-size mask
        finite = np.logical_and.reduceat(rows_ok, first.ravel())                                # per video-view
        check_finite(store, part, view, v["id"][sel], finite.reshape(len(sel), nv).all(1))
        return SplitFeatures(v["id"][sel], v["class_name"][sel], x, nv, first, count)
    if view != "maps":
        raise FeatureError(f"a head reads 'pooled', 'steps' or 'maps', not {view!r}")
    feats = store.maps()
    x = np.empty((len(sel), nv, *feats.shape[1:]), np.float16)
    for start in range(0, len(sel), block):
        chunk = sel[start:start + block]
        lo = int(v["first_row"][chunk[0]])
        hi = int(v["first_row"][chunk[-1]] + v["n_clips"][chunk[-1]] * v["n_views"][chunk[-1]])
        data = read_rows(feats, lo, hi)                # contiguous read of this block's rows
        for j, vid in enumerate(chunk):
            r, c = int(v["first_row"][vid]) - lo, int(v["n_clips"][vid])
            for k in range(nv):
                x[start + j, k] = data[r + k * c:r + (k + 1) * c].astype(np.float32).mean(0)
    check_finite(store, part, view, v["id"][sel], np.isfinite(x.reshape(len(x), -1)).all(1))
    return SplitFeatures(v["id"][sel], v["class_name"][sel], x, nv)


def read_rows(ds, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of an HDF5 dataset; a chunk that cannot be read (a fletcher32 checksum that does
    not match, lzf that does not decompress: damaged bytes) is an error naming the file and rows."""
    try:
        return ds[lo:hi]
    except OSError as e:
        raise FeatureError(f"{ds.file.filename}: rows {lo}-{hi - 1} of {ds.name} cannot be read ({e}); the file is "
                           "damaged: extract it again (`pipeline extract ... --overwrite`)") from None


def check_finite(store: FeatureStore, part: str, view: str, ids: np.ndarray, ok: np.ndarray) -> None:
    """A NaN or infinity in a video's features would become a score (argmax over NaN picks class 0):
    refused, naming the videos."""
    if ok.all():
        return
    bad = ids[~ok]
    raise NonFinite(f"{store.path}: non-finite values in the {view} features of {len(bad)} video(s) of part "
                    f"{part} ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}): the cache is damaged; "
                    "extract it again (`pipeline extract ... --overwrite`), or leave them out with --drop-nonfinite "
                    "(recorded in the checkpoint and the metrics)", bad)


def read_runs(ds, starts: np.ndarray, lengths: np.ndarray, dtype=None, block: int = 1 << 16) -> np.ndarray:
    """Rows [start, start + length) of an HDF5 dataset, concatenated in the given order, as `dtype`
    (default: the dataset's); adjacent runs are read together (a part's videos lie mostly together),
    `block` rows at a time, so a conversion never holds more than a block in the stored dtype."""
    out = np.empty((int(lengths.sum()), *ds.shape[1:]), dtype or ds.dtype)
    pos, i = 0, 0
    while i < len(starts):
        j, end = i + 1, starts[i] + lengths[i]
        while j < len(starts) and starts[j] == end:
            end += lengths[j]
            j += 1
        for lo in range(int(starts[i]), int(end), block):
            hi = min(lo + block, int(end))
            out[pos:pos + hi - lo] = read_rows(ds, lo, hi)
            pos += hi - lo
        i = j
    return out
