"""The HDF5 feature cache: clip feature maps, pooled vectors, a per-video table and provenance.

Layout (every name readable with plain h5py or `h5ls -r`):

  /features              (n_rows, 768, 8, 4, 4) float16|float32, one row per chunk, optional lzf/gzip
  /pooled                (n_rows, 768) float32, spatio-temporal mean of each row's map
                         (these three carry fletcher32 checksums: a damaged chunk is an error when
                         read, not a number; /features only since 2026-12-07: older caches read as they are)
  /steps                 (n_rows, 8, 768) float16, each row's map pooled over space only: one vector
                         per temporal position (12 KB a clip; format 2, `pipeline upgrade` adds it)
  /clips/video           (n_rows,) int32   index into /videos of the row's video
  /clips/view            (n_rows,) int16   0 = center crop, >= 1 = seeded random crop (+ flip)
  /clips/clip            (n_rows,) int16   position of the clip in its video (temporal order)
  /clips/frame_indices   (n_rows, F) int32 decoded frame indices the clip was built from
  /videos/{id, class_name, part, status, reason}   strings, one per video ("Class/stem", ...)
  /videos/warning        string, "" or what was wrong with a video that was still used (a truncated file)
  /videos/file_sha256    string, sha256 of the video file the rows were computed from: what
                         "up to date" and a resumed extraction compare, so a changed file is seen
  /videos/digest         string, sha256 of the video's stored values (maps as stored, pooled, steps,
                         frame indices), independent of compression: `pipeline info --verify`
  /videos/{label, order, first_row, n_clips, n_views, n_frames}   integers
  /videos/clip_names     string, imported caches only: the video's clips' names in its source (the
                         matching study's first frame names), newline-separated: saved episodes name them
  attrs: settings (JSON of everything that determines the features), settings_hash, provenance
         (JSON: weights sha256, library versions, root, split, ...), content_digest (sha256 over
         every video's id, status and digest, in order), format_version (2; format 1 lacks /steps
         and is read as it is, or upgraded in place by `pipeline upgrade CACHE`)

warning, file_sha256, digest and content_digest came within format 2; caches written before them read them
as "" (nothing to compare: `pipeline extract --overwrite` writes them).

An imported cache (`pipeline import-features`: another tool's per-video clip vectors) has /pooled
(n_rows, D) and no /features or /steps (F = 0): settings["source"] says where it came from.

Rows of one video are contiguous, view-major: row first_row + view * n_clips + clip. A failed video
has status "failed", a reason, and no rows. `order` is the video's position in the full,
unsharded video list, so shards and parts merge back into one canonical order.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from .errors import MissingFile, PipelineError
from .files import atomic_path, check_output, exclusive

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)   # 1: before /steps
STR = h5py.string_dtype("utf-8")
VIDEO_STR = ("id", "class_name", "part", "status", "reason", "warning", "file_sha256", "digest")
VIDEO_INT = ("label", "order", "first_row", "n_clips", "n_views", "n_frames")
# name -> h5py filter options of the maps, and the demo maps' measured size ratio (bench/store.py).
# blosc-lz4 (Blosc through hdf5plugin, which registers its filters with HDF5 on import: caches written
# with it read anywhere hdf5plugin is imported) writes the demo's maps 5x faster than lzf, 9% larger.
COMPRESSION = {"none": {}, "lzf": {"compression": "lzf", "shuffle": True},
               "gzip": {"compression": "gzip", "compression_opts": 4, "shuffle": True},
               "blosc-lz4": dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))}
SIZE_RATIO = {"none": 1.0, "lzf": 1.57, "gzip": 1.57, "blosc-lz4": 1.45}


class CacheError(PipelineError):
    """A cache file that cannot be read as a feature cache."""


class CacheMismatch(CacheError):
    """A cache file made with other settings than the ones asked for."""


def settings_diff(a: dict, b: dict) -> list[str]:
    """The top-level keys whose values differ between two settings dicts."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def check_settings(have: dict | None, wanted: dict, what, fix: str) -> None:
    """The one settings comparison: `what` (a file, folder or checkpoint) holds `have`; anything
    but `wanted` is refused with each differing key, both values, and `fix` (what to do)."""
    if have == wanted:
        return
    if have is None:
        raise CacheMismatch(f"{what} is not a feature cache made by this tool; {fix}")
    detail = "; ".join(f"{k}: {have.get(k)!r} there vs {wanted.get(k)!r} here" for k in settings_diff(have, wanted))
    raise CacheMismatch(f"{what} was made with other settings ({detail}); {fix}")


def pool_maps(maps: np.ndarray) -> np.ndarray:
    """(n, C, t, h, w) clip maps -> (n, C) float32: the cache's pooled view, a spatio-temporal mean."""
    return maps.reshape(len(maps), maps.shape[1], -1).mean(-1, dtype=np.float32)


def step_maps(maps: np.ndarray) -> np.ndarray:
    """(n, C, t, h, w) clip maps -> (n, t, C) float16: the per-time-step view, pooled over space only."""
    return maps.reshape(*maps.shape[:3], -1).mean(-1, dtype=np.float32).transpose(0, 2, 1).astype(np.float16)


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class VideoResult:
    """One extracted (or failed) video, ready to be written."""

    id: str
    class_name: str
    part: str
    label: int
    order: int
    maps: np.ndarray | None = None       # (views * clips, 768, T', H', W')
    pooled: np.ndarray | None = None     # (views * clips, 768)
    steps: np.ndarray | None = None      # (views * clips, T', 768)
    frame_indices: np.ndarray | None = None  # (clips, F)
    chunks: list | None = None           # instead of maps: already-filtered HDF5 chunks (mask, bytes) to copy
    clip_names: list | None = None       # imported caches: each clip's name in its source
    n_views: int = 0
    n_frames: int = 0
    status: str = "ok"
    reason: str = ""
    warning: str = ""
    file_sha256: str = ""
    digest: str = ""                     # given with chunks (copied from the source); else computed


def values_digest(*arrays: np.ndarray) -> str:
    """sha256 of one video's stored values (maps, pooled, steps, frame indices; an imported cache's pooled
    and frame indices), in the stored dtypes: equal data, equal digest, whatever the compression bytes."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class StoreWriter:
    """Creates a cache file and appends videos to it (used for parts, shards and merges alike)."""

    def __init__(self, path, settings: dict, provenance: dict, map_shape, frames: int, feature_size: int = 0):
        """map_shape (C, t, h, w); None for an imported cache of `feature_size`-d clip vectors."""
        self.path = Path(path)
        self.f = h5py.File(self.path, "w")
        self.maps = map_shape is not None
        size = map_shape[0] if self.maps else feature_size
        if self.maps:
            self.f.create_dataset("features", (0, *map_shape), np.dtype(settings["dtype"]), maxshape=(None, *map_shape),
                                  chunks=(1, *map_shape), fletcher32=True, **COMPRESSION[settings["compression"]])
            _create_steps(self.f, 0, map_shape)
        else:
            self.f.create_dataset("videos/clip_names", (0,), STR, maxshape=(None,), chunks=True)
        self.f.create_dataset("pooled", (0, size), np.float32, maxshape=(None, size), chunks=(256, size),
                              fletcher32=True)
        for name, dt, shape in (("video", np.int32, ()), ("view", np.int16, ()), ("clip", np.int16, ()),
                                ("frame_indices", np.int32, (frames,))):
            self.f.create_dataset(f"clips/{name}", (0, *shape), dt, maxshape=(None, *shape), chunks=True)
        for name in VIDEO_STR:
            self.f.create_dataset(f"videos/{name}", (0,), STR, maxshape=(None,), chunks=True)
        for name in VIDEO_INT:
            self.f.create_dataset(f"videos/{name}", (0,), np.int64, maxshape=(None,), chunks=True)
        self.f.attrs["format_version"] = FORMAT_VERSION
        self.f.attrs["settings"] = json.dumps(settings, sort_keys=True)
        self.f.attrs["settings_hash"] = settings_hash(settings)
        self.f.attrs["provenance"] = json.dumps(provenance, sort_keys=True)
        self.rows = 0
        self.videos = 0
        self._queued: dict[str, list] = {}   # dataset -> arrays not yet written
        self._queued_rows = 0
        self._content = hashlib.sha256()

    def _queue(self, name: str, values) -> None:
        self._queued.setdefault(name, []).append(np.asarray(values))

    def flush(self) -> None:
        """Write what `add` queued: one resize and write per dataset for many videos, not per video
        (per-video writes cost ~4 ms a clip in extraction)."""
        for name, arrays in self._queued.items():
            ds, values = self.f[name], np.concatenate(arrays)
            n = ds.shape[0]
            ds.resize(n + len(values), axis=0)
            ds[n:] = values
        self._queued, self._queued_rows = {}, 0

    def add(self, v: VideoResult) -> None:
        rows = 0 if v.pooled is None else len(v.pooled)
        clips = 0 if rows == 0 else rows // v.n_views
        if v.chunks is not None:  # merging: copy compressed chunks as they are, no decode/re-encode
            if "features" in self._queued:  # chunks go straight to their rows: queued maps first
                self.flush()
            feats = self.f["features"]
            feats.resize(self.rows + rows, axis=0)
            zeros = (0,) * (feats.ndim - 1)
            for i, (mask, data) in enumerate(v.chunks):
                feats.id.write_direct_chunk((self.rows + i, *zeros), data, mask)
        digest = v.digest
        if rows:
            pooled = v.pooled.astype(np.float32, copy=False)
            indices = np.tile(v.frame_indices, (v.n_views, 1)).astype(np.int32, copy=False)
            if not self.maps:
                digest = v.digest or values_digest(pooled, indices)     # an importer's reading thread may give it
            else:
                steps = (step_maps(v.maps) if v.steps is None else v.steps).astype(np.float16, copy=False)
                self._queue("steps", steps)
                if v.chunks is None:
                    maps = v.maps.astype(self.f["features"].dtype, copy=False)
                    self._queue("features", maps)
                    digest = values_digest(maps, pooled, steps, indices)
                    if v.digest and digest != v.digest:    # re-encoded in a merge: damage is not carried over
                        raise CacheError(f"{v.id}: its stored values differ from those written (damaged bytes in "
                                         "a file without checksums on its maps); extract it again "
                                         "(`pipeline info FILE --verify` names every such video)")
            self._queue("pooled", pooled)
            self._queue("clips/video", np.full(rows, self.videos, np.int32))
            self._queue("clips/view", np.repeat(np.arange(v.n_views), clips))
            self._queue("clips/clip", np.tile(np.arange(clips), v.n_views))
            self._queue("clips/frame_indices", indices)
        for name in VIDEO_STR:
            value = digest if name == "digest" else getattr(v, name)
            self._queue(f"videos/{name}", np.array([value], dtype=object))
        if not self.maps:               # one string a video: per-clip strings cost HDF5 a write each
            self._queue("videos/clip_names", np.array(["\n".join(v.clip_names or [])], dtype=object))
        self._content.update(f"{v.id}\t{v.status}\t{digest}\n".encode())
        ints = dict(label=v.label, order=v.order, first_row=self.rows, n_clips=clips, n_views=v.n_views,
                    n_frames=v.n_frames)
        for name in VIDEO_INT:
            self._queue(f"videos/{name}", [ints[name]])
        self.rows += rows
        self.videos += 1
        self._queued_rows += rows
        if self._queued_rows >= (256 if self.maps else 16384):   # bounds the memory held: 256 clips of maps,
            self.flush()                                           # or 16k clip vectors (32 MB at 512-d)

    def close(self) -> None:
        if self.f:
            self.flush()
            self.f.attrs["content_digest"] = self._content.hexdigest()
            self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FeatureStore:
    """Read access to a finished cache. The video table is loaded into memory; maps stay on disk."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFile(f"feature cache {self.path} does not exist (run `pipeline extract`, or `pipeline import-features`)")
        try:
            self.f = h5py.File(self.path, "r")
        except OSError as e:
            raise CacheError(f"feature cache {self.path}: not a readable HDF5 file ({e})") from e
        self.version = self.f.attrs.get("format_version")
        if self.version not in READABLE_VERSIONS:
            self.f.close()
            raise CacheError(f"feature cache {self.path}: format version {self.version}, this code reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))} (a newer version of this tool wrote it?)")
        self.settings = json.loads(self.f.attrs["settings"])
        self.settings_hash = self.f.attrs["settings_hash"]
        self.provenance = json.loads(self.f.attrs["provenance"])
        n = self.f["videos/id"].shape[0]
        self.videos = {name: self.f[f"videos/{name}"].asstr()[:] if f"videos/{name}" in self.f
                       else np.full(n, "", object) for name in VIDEO_STR}     # older files lack the digests
        self.videos.update({name: self.f[f"videos/{name}"][:] for name in VIDEO_INT})

    def __len__(self) -> int:
        return len(self.videos["id"])

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def imported(self) -> bool:
        """Imported from another tool's clip vectors: no maps, no per-step view."""
        return "features" not in self.f

    def maps(self) -> h5py.Dataset:
        """The clip feature maps (n_rows, 768, t, h, w)."""
        if self.imported:
            raise CacheError(f"feature cache {self.path} was imported from {self.settings.get('source')} clip vectors: "
                             "it has no feature maps; choose a head that reads pooled clip vectors (`pipeline heads`)")
        return self.f["features"]

    def steps(self) -> h5py.Dataset:
        """The per-time-step view (n_rows, t, 768) float16."""
        if self.imported:
            raise CacheError(f"feature cache {self.path} was imported from {self.settings.get('source')} clip vectors: "
                             "it has no per-time-step view; use the head without per_step (each clip is one step)")
        if "steps" not in self.f:
            raise CacheError(f"feature cache {self.path} has no per-time-step view (/steps; format "
                             f"{self.version}, written before it existed): run `pipeline upgrade {self.path}` "
                             "(reads the maps once, resumable)")
        return self.f["steps"]

    def rows(self, video: int, view: int = 0) -> np.ndarray:
        """Row numbers of one video's clips for one view, in temporal order."""
        first, n = self.videos["first_row"][video], self.videos["n_clips"][video]
        return np.arange(first + view * n, first + (view + 1) * n)

    def pooled_sequences(self, videos, view=0) -> np.ndarray:
        """(len(videos), clips, 768) float32, for videos that all have the same clip count."""
        pooled = self.f["pooled"]
        return np.stack([pooled[self.rows(v, view)[0]:self.rows(v, view)[-1] + 1] for v in videos])

    def failures(self) -> list[tuple[str, str]]:
        bad = np.flatnonzero(self.videos["status"] != "ok")
        return [(self.videos["id"][i], self.videos["reason"][i]) for i in bad]


def content_summary(path) -> dict:
    """What a cache holds, in a form whose bytes depend only on its values: the content digest, the
    settings hash and counts. DVC's view of the cache (the extract stage's output): lzf's compressed
    bytes are not repeatable (its hash table starts from uninitialised memory), so the file's own md5
    changes between identical extractions while this does not."""
    with FeatureStore(path) as s:
        return dict(content_digest=s.f.attrs.get("content_digest"), settings_hash=s.settings_hash,
                    format_version=int(s.version), videos=len(s), failed=len(s.failures()),
                    clip_rows=int(s.f["pooled"].shape[0]))


def read_settings(path) -> dict | None:
    try:
        with h5py.File(path, "r") as f:
            return json.loads(f.attrs["settings"])
    except (OSError, KeyError):
        return None


def filters(ds: h5py.Dataset) -> tuple:
    """The filter pipeline of a dataset: raw chunks can be copied between two datasets only when equal."""
    plist = ds.id.get_create_plist()
    return tuple(plist.get_filter(i)[:3] for i in range(plist.get_nfilters()))


def merge(inputs, out, settings: dict | None = None, expect: dict[int, str] | None = None) -> int:
    """Join cache files (parts or shards) into `out`, videos sorted by `order`; written to a
    temporary name and renamed, so `out` is either absent or complete. Returns the video count.

    All inputs must share the same settings; every video must appear exactly once, and with
    `expect` (order -> video id), exactly those videos under those numbers.
    """
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise CacheError("merge: no input files")
    stores = [FeatureStore(p) for p in inputs]
    try:
        for s in stores:
            s.steps()            # an older file: upgrade it first rather than merge a cache without the view
        ref = settings if settings is not None else stores[0].settings
        for s in stores:
            check_settings(s.settings, ref, s.path, f"it cannot be merged with {stores[0].path}")
        where = {}
        for si, s in enumerate(stores):
            for vi, o in enumerate(s.videos["order"]):
                if o in where:
                    first, fi = stores[where[o][0]], where[o][1]
                    if first.videos["id"][fi] != s.videos["id"][vi]:
                        raise CacheMismatch(f"video number {o} is {first.videos['id'][fi]} in {first.path} but "
                                            f"{s.videos['id'][vi]} in {s.path}: the files were cut from different "
                                            "video lists and cannot be merged")
                    raise CacheMismatch(f"video {s.videos['id'][vi]} is in both {first.path} and {s.path}")
                where[o] = (si, vi)
        if expect is not None:
            missing = sorted(set(expect) - set(where))
            if missing:
                raise CacheMismatch(f"merge: {len(missing)} video(s) missing from the inputs ({expect[missing[0]]}, "
                                    "...)")
            for o, (si, vi) in where.items():
                if expect.get(o) != stores[si].videos["id"][vi]:
                    raise CacheMismatch(f"{stores[si].path} holds {stores[si].videos['id'][vi]} as video number {o}, "
                                        f"but this extraction's video {o} is {expect.get(o, '(none)')}: the file "
                                        "belongs to an extraction of other videos")
        first = stores[0]
        check_output(out, "merged cache", need_bytes=sum(p.stat().st_size for p in inputs))
        with atomic_path(out) as tmp, StoreWriter(tmp, ref, first.provenance, first.f["features"].shape[1:],
                                                  first.f["clips/frame_indices"].shape[1]) as writer:
            same = [filters(s.f["features"]) == filters(writer.f["features"]) for s in stores]
            for si, vis, orders in _runs(where):
                _copy_run(stores[si], vis, orders, same[si], writer)
        return len(where)
    finally:
        for s in stores:
            s.close()


class Appender:
    """A new cache at `path` made of whole cache files (an extraction's parts) appended in `order` as
    they are finished, so the merge is done when the last part is; on leaving the block, every video
    of `expect` (order -> id) must be there."""

    def __init__(self, path, settings: dict, expect: dict[int, str]):
        self.path, self.settings, self.expect = Path(path), settings, expect
        self.writer: StoreWriter | None = None
        self.last = -1

    def add(self, part) -> None:
        with FeatureStore(part) as s:
            s.steps()
            check_settings(s.settings, self.settings, s.path, "it cannot be merged with this extraction")
            ids, orders = s.videos["id"], s.videos["order"]
            for vid, o in zip(ids, orders):
                if o <= self.last or self.expect.get(int(o)) != vid:
                    raise CacheMismatch(f"{s.path} holds {vid} as video number {o}, but this extraction's video {o} "
                                        f"is {self.expect.get(int(o), '(none)')}, after {self.last}: the file belongs "
                                        "to an extraction of other videos")
                self.last = int(o)
            if self.writer is None:
                self.writer = StoreWriter(self.path, self.settings, s.provenance, s.f["features"].shape[1:],
                                          s.f["clips/frame_indices"].shape[1])
            same = filters(s.f["features"]) == filters(self.writer.f["features"])
            for _, vis, got in _runs({int(o): (0, vi) for vi, o in enumerate(orders)}):
                _copy_run(s, vis, got, same, self.writer)

    def __enter__(self):
        return self

    def __exit__(self, kind, *_) -> None:
        if self.writer is not None:
            self.writer.close()
        if kind is None and (self.writer is None or self.writer.videos != len(self.expect)):
            raise CacheMismatch(f"merge: {len(self.expect) - (self.writer.videos if self.writer else 0)} video(s) "
                                "missing from the parts")


def _runs(where: dict, most: int = 256):
    """(store, [video indices], [orders]) for videos in `order`, cut where the next video is not the
    next one of the same store: each run is a block of consecutive rows, read at once."""
    run = None
    for o in sorted(where):
        si, vi = where[o]
        if run and (run[0] != si or run[1][-1] + 1 != vi or len(run[1]) == most):
            yield run
            run = None
        run = run or (si, [], [])
        run[1].append(vi)
        run[2].append(o)
    if run:
        yield run


def _copy_run(s: "FeatureStore", vis: list, orders: list, same_filters: bool, writer: StoreWriter) -> None:
    """Videos `vis` (consecutive) of `s` into `writer`: the maps' compressed chunks as they are where
    the filters are the same (else decoded and re-encoded), the other views read in one block."""
    first, n_rows = s.videos["first_row"][vis], s.videos["n_clips"][vis] * s.videos["n_views"][vis]
    r0, r1 = int(first[0]), int(first[-1] + n_rows[-1])
    feats = s.f["features"]
    pooled, steps, indices = (s.f[k][r0:r1] for k in ("pooled", "steps", "clips/frame_indices"))
    maps = None if same_filters else feats[r0:r1]
    zeros = (0,) * (feats.ndim - 1)
    for vi, o, r, n in zip(vis, orders, first - r0, n_rows):
        v = VideoResult(**{k: s.videos[k][vi] for k in VIDEO_STR}, label=int(s.videos["label"][vi]), order=int(o),
                        n_views=int(s.videos["n_views"][vi]), n_frames=int(s.videos["n_frames"][vi]))
        if n:
            if same_filters:
                v.chunks = [feats.id.read_direct_chunk((r0 + row, *zeros)) for row in range(r, r + n)]
            else:            # a part written without the maps' checksums: decoded and re-encoded
                v.maps = maps[r:r + n]
            v.pooled, v.steps = pooled[r:r + n], steps[r:r + n]
            v.frame_indices = indices[r:r + s.videos["n_clips"][vi]]
        writer.add(v)


def verify(path, block: int = 256, progress: bool = True) -> tuple[int, list[str]]:
    """Reads every stored value and compares each video's digest, and the table's content digest, with
    those recorded when the cache was written. Returns (videos checked, problems: one line each)."""
    from tqdm import tqdm

    problems, checked = [], 0
    with FeatureStore(path) as s:
        v = s.videos
        ds = ([s.f["pooled"], s.f["clips/frame_indices"]] if s.imported else     # in the digest's order, kept
              [s.f["features"], s.f["pooled"], s.steps(), s.f["clips/frame_indices"]])   # open: chunk caches
        rows = v["n_clips"] * v["n_views"] * (v["status"] == "ok")
        table = hashlib.sha256()
        for lo in tqdm(range(0, len(s), block), unit="block", disable=not progress, desc=f"verify {s.path.name}"):
            ids = range(lo, min(lo + block, len(s)))
            first = int(v["first_row"][ids[0]])
            try:
                data = [d[first:first + int(rows[ids].sum())] for d in ds]
            except OSError:
                data = None                          # read video by video below, to name the damaged ones
            for i in ids:
                table.update(f"{v['id'][i]}\t{v['status'][i]}\t{v['digest'][i]}\n".encode())
                if not rows[i] or not v["digest"][i]:
                    continue
                r, n = int(v["first_row"][i]), int(rows[i])
                try:
                    values = [d[r:r + n] for d in ds] if data is None else [x[r - first:r - first + n] for x in data]
                except OSError as e:
                    problems.append(f"{v['id'][i]}: rows {r}-{r + n - 1} cannot be read ({e})")
                    continue
                checked += 1
                if values_digest(*values) != v["digest"][i]:
                    problems.append(f"{v['id'][i]}: stored values differ from those written (rows {r}-{r + n - 1})")
        recorded = s.f.attrs.get("content_digest")
        if recorded is None:
            problems.append("no content digest recorded (a cache written before digests: `pipeline extract "
                            "--overwrite` writes them)")
        elif table.hexdigest() != recorded:
            problems.append("the video table (ids, status or digests) differs from the one written")
    return checked, problems


def _create_steps(f: h5py.File, rows: int, map_shape) -> h5py.Dataset:
    shape = (map_shape[1], map_shape[0])                    # (t, C)
    return f.create_dataset("steps", (rows, *shape), np.float16, maxshape=(None, *shape), chunks=(64, *shape),
                            fletcher32=True)


def upgrade(path, block: int = 256, progress: bool = True) -> str:
    """Adds the per-time-step view to a format-1 cache: a copy with /steps is built beside it
    (`<path>.upgrading`, raw chunks copied, the maps read once) and renamed onto `path` when complete,
    so the cache is never half-written. Interrupted, it resumes from the last block written."""
    from tqdm import tqdm

    path = Path(path)
    with exclusive(path, "feature cache"):
        with FeatureStore(path) as s:
            if "steps" in s.f:
                return f"{path}: already format {s.version}, nothing to do"
            n_rows, map_shape = s.f["features"].shape[0], s.f["features"].shape[1:]
        stat = path.stat()
        source = f"{settings_hash(read_settings(path))}:{stat.st_size}:{stat.st_mtime_ns}"
        tmp = path.with_name(f"{path.name}.upgrading")
        dst = _resumable(tmp, source)
        if dst is None:
            with h5py.File(path, "r") as src, h5py.File(tmp, "w") as new:
                for name in src:
                    src.copy(src[name], new, name)        # H5Ocopy: chunks as they are, no re-encoding
                new.attrs.update(dict(src.attrs))
                new.attrs["upgrade_source"] = source
                new.attrs["steps_done"] = 0
                _create_steps(new, n_rows, map_shape)
            dst = h5py.File(tmp, "r+")
        try:
            done = int(dst.attrs["steps_done"])
            feats, steps = dst["features"], dst["steps"]
            with tqdm(total=n_rows, initial=done, unit="clip", disable=not progress, desc=f"upgrade {path.name}") as bar:
                for lo in range(done, n_rows, block):
                    hi = min(lo + block, n_rows)
                    steps[lo:hi] = step_maps(feats[lo:hi])
                    dst.flush()                            # rows before steps_done are on disk
                    dst.attrs["steps_done"] = hi
                    bar.update(hi - lo)
            dst.attrs["format_version"] = FORMAT_VERSION
            del dst.attrs["upgrade_source"], dst.attrs["steps_done"]
        finally:
            dst.close()
        os.replace(tmp, path)
        return f"{path}: upgraded to format {FORMAT_VERSION} ({n_rows} clips given their per-step view)"


def _resumable(tmp: Path, source: str) -> h5py.File | None:
    """An unfinished upgrade of the same source file, opened for writing, or None (anything else there
    is removed)."""
    if not tmp.exists():
        return None
    try:
        f = h5py.File(tmp, "r+")
    except OSError:
        tmp.unlink()
        return None
    if f.attrs.get("upgrade_source") == source and "steps" in f:
        return f
    f.close()
    tmp.unlink()
    return None
