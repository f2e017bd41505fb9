"""Importing another tool's per-video clip vectors into a feature cache: no network, no video.

Two source layouts:
  temporal_matching  the matching study's released features (Bertrand et al. 2023,
                     jbertrand89/temporal_matching, DATA_PREPARATION.md): <root>/<part>/<class>/<video>/
                     video_features.pth, a float tensor (clips, D), or (D,) for a video of exactly one
                     clip, written with torch.save; clip_names.txt beside it, one line per clip, the
                     clip's frame names joined by commas (what their saved episodes name clips by).
  files              one array per video, (clips, D) or (D,): <root>/<part>/<class>/<video>.{npy,pth,pt},
                     or <root>/<class>/<video>.* with a split folder (`--split`, *_classes.txt) saying
                     which class is in which part.

The cache holds /pooled (the vectors, float32 as given) and no maps or per-step view; each video's
file sha256 makes re-importing the same files "up to date" and changed files a refusal.
"""
from __future__ import annotations

import hashlib
import io
import json
import platform
import time
from collections import deque
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, PipelineError
from .extraction.datasets import PARTS, load_split
from .extraction.extractor import _cache_videos, check_duplicates, describe_change
from .files import atomic_path, check_output, exclusive
from .store import CacheMismatch, StoreWriter, VideoResult, check_settings, read_settings, values_digest

LAYOUTS = ("temporal_matching", "files")
SUFFIXES = (".npy", ".pth", ".pt")


class FeatureImportError(PipelineError):
    """A feature file that cannot be imported; the message names it."""


@dataclass
class Source:
    id: str                    # "Class/video"
    class_name: str
    part: str
    path: Path                 # the feature file
    names: Path | None = None  # clip_names.txt (temporal_matching)


def scan_sources(root, layout: str, split=None) -> list[Source]:
    """Every video's feature file under `root`, in part, class and video order."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not root.is_dir():
        raise FeatureImportError(f"feature root {root} does not exist or is not a folder")
    listed = None                   # a split's *_videos.txt: only those videos
    if split is None:
        parts = {p: root / p for p in PARTS if (root / p).is_dir()}
        if not parts:
            raise FeatureImportError(f"{root}: no train/, val/ or test/ folder (the {layout} layout keeps one per part"
                               + ("" if layout == "temporal_matching" else "; or give --split with class lists") + ")")
        classes = {p: sorted(c.name for c in d.iterdir() if c.is_dir()) for p, d in parts.items()}
    else:
        if layout == "temporal_matching":
            raise ConfigError("--split is for the files layout; temporal_matching keeps one folder per part")
        s = load_split(split)
        parts, classes, listed = {p: root for p in PARTS}, s.classes, s.videos
        absent = [c for p in PARTS for c in classes[p] if not (root / c).is_dir()]
        if absent:
            raise FeatureImportError(f"{root}: no folder for {len(absent)} class(es) of the split (e.g. {absent[0]})")
    sources = []
    for part, folder in parts.items():
        for c in classes[part]:
            for v in sorted((folder / c).iterdir()):
                if layout == "temporal_matching" and v.is_dir():
                    names = v / "clip_names.txt"
                    sources.append(Source(f"{c}/{v.name}", c, part, v / "video_features.pth",
                                          names if names.is_file() else None))
                elif layout == "files" and v.is_file() and v.suffix in SUFFIXES:
                    if sources and sources[-1].id == f"{c}/{v.stem}":
                        raise FeatureImportError(f"{sources[-1].path} and {v}: two files of one video; keep one")
                    sources.append(Source(f"{c}/{v.stem}", c, part, v))
    if not sources:
        raise FeatureImportError(f"{root}: no feature files in the {layout} layout")
    if listed:
        wanted = {v for ids in listed.values() for v in ids}
        absent = sorted(wanted - {x.id for x in sources})
        if absent:
            raise FeatureImportError(f"{root}: {len(absent)} video(s) listed by the split have no file (e.g. {absent[0]})")
        sources = [x for x in sources if x.id in wanted]
    return sources


def load_array(path: Path, data: bytes | None = None) -> np.ndarray:
    """The array in a .npy file or a torch.save'd tensor (anything else is an error naming the file)."""
    data = path.read_bytes() if data is None else data
    try:
        if path.suffix == ".npy":
            return np.load(io.BytesIO(data), allow_pickle=False)
        import torch
        t = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:       # torch and numpy raise many kinds for a file that is not theirs
        raise FeatureImportError(f"{path}: not a readable {path.suffix} array ({type(e).__name__}: {e})") from None
    if not isinstance(t, torch.Tensor):
        raise FeatureImportError(f"{path}: holds a {type(t).__name__}, not a tensor")
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def read_vectors(path: Path, data: bytes, ndim: tuple = (1, 2)) -> np.ndarray:
    """(clips, D) float32 from a feature file's bytes ((D,) is one clip)."""
    x = load_array(path, data)
    if not np.issubdtype(x.dtype, np.floating) or x.ndim not in ndim or x.size == 0:
        raise FeatureImportError(f"{path}: expected float clip features (clips, D) or (D,), got {x.dtype} {x.shape}")
    return np.atleast_2d(x).astype(np.float32, copy=False)


def clip_names(path: Path | None, text: bytes, clips: int) -> list[str]:
    """Each clip's first frame name (how saved episodes name a clip), from clip_names.txt's bytes;
    "" for each clip without one."""
    if path is None:
        return [""] * clips
    lines = [ln.strip() for ln in text.decode("utf-8").splitlines() if ln.strip()]
    if len(lines) != clips:
        raise FeatureImportError(f"{path}: {len(lines)} clip name lines for {clips} clip features")
    return [ln.split(",")[0] for ln in lines]


def _read(src: Source):
    """(file sha256, vectors, clip names, digest of the values as stored, non-finite rows): all the
    per-file work, done in the reading processes."""
    try:
        data = src.path.read_bytes()
        names = src.names.read_bytes() if src.names else b""
    except OSError as e:
        raise FeatureImportError(f"{e.filename}: cannot be read ({e.strerror or e})") from None
    x = read_vectors(src.path, data)
    return (_source_digest(data, names), x, clip_names(src.names, names, len(x)),
            values_digest(x, np.zeros((len(x), 0), np.int32)), np.flatnonzero(~np.isfinite(x).all(1)))


def _source_digest(data: bytes, names: bytes) -> str:
    """The sha256 of a video's feature file, or of the file and its clip_names.txt: what "up to date"
    and the duplicate check compare, so a changed name file is a changed video too."""
    h = hashlib.sha256(data)
    if names:
        h.update(b"\0clip_names.txt\0" + names)
    return h.hexdigest()


def _reader_init() -> None:
    """In a forked reading process: torch on one thread, so that no tensor operation enters an OpenMP
    region the parent may have used (GNU OpenMP does not survive a fork)."""
    import torch
    torch.set_num_threads(1)


def _read_batch(sources: list) -> list:
    return [_read(s) for s in sources]


def _read_all(pool, sources: list, batch: int = 16, ahead: int = 8):
    """_read of every source, in order: batches of `batch` files read by the pool's processes (torch.load
    holds the GIL: threads would take turns), at most `ahead` batches ahead (pool.map would queue them
    all, and fast readers would hold every file's vectors in memory)."""
    batches = [sources[i:i + batch] for i in range(0, len(sources), batch)]
    futures = deque(pool.submit(_read_batch, b) for b in batches[:ahead])
    for nxt in batches[ahead:] + [None] * len(futures):
        results = futures.popleft().result()
        if nxt is not None:
            futures.append(pool.submit(_read_batch, nxt))
        yield from results


def _digest(src: Source) -> str:
    try:
        return _source_digest(src.path.read_bytes(), src.names.read_bytes() if src.names else b"")
    except OSError as e:
        raise FeatureImportError(f"{e.filename}: cannot be read ({e.strerror or e})") from None


def import_features(root, out, layout: str, backbone: str, split=None, workers: int = 2, overwrite: bool = False,
                    drop_nonfinite: bool = False, allow_duplicates: bool = False, progress: bool = True) -> dict:
    """Import every video's clip vectors under `root` into the cache `out`. Returns a summary dict.

    Where `out` exists, every file's sha256 first (an unchanged cache is "up to date", a changed one is
    refused before anything is written); then one pass reads, hashes, checks and writes the vectors in
    order, a few batches of videos in memory per reading process (`workers` of them: torch.load holds
    the GIL, so threads would take turns). Files shared across parts are refused before the cache is
    renamed into place."""
    from tqdm import tqdm

    if not backbone:
        raise ConfigError("--backbone must name the network the features came from (e.g. r2plus1d_34)")
    sources = scan_sources(root, layout, split)
    out = Path(out)
    check_output(out, "feature cache", need_bytes=int(1.1 * sum(s.path.stat().st_size for s in sources
                                                                  if s.path.is_file())))
    classes = list(dict.fromkeys(s.class_name for p in PARTS for s in sources if s.part == p))
    label = {c: i for i, c in enumerate(classes)}
    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(max(1, workers), mp_context=multiprocessing.get_context("fork"),
                               initializer=_reader_init)
    try:
        with exclusive(out, "feature cache"):
            size = _read(sources[0])[1].shape[1]
            settings = dict(source=layout, backbone=backbone, feature_size=size, dtype="float32", compression="none")
            digests = None
            if out.exists():                # an earlier import: up to date, or refused, before anything is written
                digests = list(pool.map(_digest, sources, chunksize=64))
                videos = [[s.id, s.part, label[s.class_name], d] for s, d in zip(sources, digests)]
                have = read_settings(out)
                change = describe_change(_cache_videos(out), videos) if have == settings else None
                if have == settings and not change:
                    return dict(path=str(out), status="up to date", videos=len(sources))
                if not overwrite:
                    fix = "use --overwrite to replace it or choose another --out"
                    check_settings(have, settings, out, fix)
                    raise CacheMismatch(f"{out} was imported with the same settings from other files ({change}); {fix}")
            provenance = dict(root=str(Path(root).resolve()), layout=layout, backbone=backbone,
                              split=str(split) if split else "", numpy=np.__version__, python=platform.python_version())
            failed, clips = [], 0
            with tqdm(total=len(sources), unit="video", disable=not progress, desc=f"import {out.name}") as bar, \
                    atomic_path(out) as tmp, StoreWriter(tmp, settings, provenance, None, 0, feature_size=size) as w:
                read = []
                for order, (s, (sha, x, names, digest, bad)) in enumerate(zip(sources, _read_all(pool, sources))):
                    if digests is not None and sha != digests[order]:
                        raise FeatureImportError(f"{s.path}: changed while it was imported; import again")
                    read.append([s.id, s.part, label[s.class_name], sha])
                    if x.shape[1] != size:
                        raise FeatureImportError(f"{s.path}: {x.shape[1]}-d features, but {sources[0].path} has {size}-d: "
                                                 "the files come from different networks")
                    v = VideoResult(s.id, s.class_name, s.part, label[s.class_name], order, n_views=1, file_sha256=sha)
                    if len(bad):
                        v.status, v.reason = "failed", f"non-finite values in clip(s) {', '.join(map(str, bad[:5]))}"
                        if not drop_nonfinite:
                            raise FeatureImportError(f"{s.path}: {v.reason}: the file is damaged; pass --drop-nonfinite "
                                                     "to record the video as failed and go on")
                        failed.append((s.id, v.reason))
                    else:
                        v.pooled, v.frame_indices, v.clip_names = x, np.zeros((len(x), 0), np.int32), names
                        v.digest = digest
                        clips += len(x)
                    w.add(v)
                    bar.update()
                duplicates = check_duplicates(read, allow_duplicates)   # one pass: checked before the rename
                if duplicates:
                    w.f.attrs["provenance"] = json.dumps(dict(provenance, duplicates=duplicates), sort_keys=True)
    finally:
        pool.shutdown(cancel_futures=True)      # an error stops the reading of the files still queued
    seconds = time.perf_counter() - t0
    return dict(path=str(out), status="written", videos=len(sources), failed=failed, feature_size=size, clips=clips,
                seconds=seconds, videos_per_s=len(sources) / seconds if seconds > 0 else 0.0)


def _episode_numbers(folder: Path) -> list[int]:
    nums = sorted(int(p.stem.rsplit("_", 1)[1]) for p in folder.glob("support_set_*.pth")
                  if p.stem.rsplit("_", 1)[1].isdigit())
    if not nums:
        raise FeatureImportError(f"{folder}: no saved episodes (support_set_<i>.pth ...)")
    gaps = sorted(set(range(1, nums[-1] + 1)) - set(nums))
    if nums[0] != 1 or gaps:
        raise FeatureImportError(f"{folder}: saved episodes are numbered from 1 without gaps; episode "
                                 f"{gaps[0] if gaps else 1} is missing (an incomplete download?)")
    return nums


def _saved(folder: Path, name: str, i: int) -> np.ndarray:
    """One saved episode array: a set (members, T, D) of floats or labels (members,)."""
    path = folder / f"{name}_{i}.pth"
    if not path.is_file():
        raise FeatureImportError(f"{path}: missing (episode {i} is incomplete)")
    x = load_array(path)
    want = 3 if name.endswith("set") else 1
    if x.ndim != want:
        raise FeatureImportError(f"{path}: expected a {want}-d tensor, got shape {x.shape}")
    return x


def import_episodes(folder, cache, out, count: int | None = None, part: str = "test", progress: bool = True) -> dict:
    """The matching study's saved test episodes (`<dataset>_w<N>_s<K>/`, files numbered from 1) as a
    fixed-sequence episode file for `cache`: each member is found in the cache by its video name (the
    first part of its frame names) and each of its clips by its first frame name, and the saved
    features must equal the cache's at those clips. Evaluation then scores exactly their sequences."""
    from tqdm import tqdm

    from .fewshot.episodes import save_sequences
    from .fewshot.features import load
    from .store import FeatureStore

    folder = Path(folder)
    if not folder.is_dir():
        raise FeatureImportError(f"episode folder {folder} does not exist or is not a folder")
    nums = _episode_numbers(folder)
    if count is not None and count > len(nums):
        raise FeatureImportError(f"{folder}: --count {count}, but it holds {len(nums)} saved episodes")
    nums = nums[:count]
    with FeatureStore(cache) as st:
        if not st.imported or "videos/clip_names" not in st.f:
            raise FeatureImportError(f"{cache}: not a cache imported with clip names (`pipeline import-features "
                                     "--layout temporal_matching`); saved episodes name clips by their frames")
        feats = load(st, part, "pooled")             # the part's clip vectors, in memory
        rows = np.flatnonzero(np.isin(st.videos["id"], feats.ids))                # in the order of feats
        names = st.f["videos/clip_names"].asstr()[rows[0]:rows[-1] + 1][rows - rows[0]]
        content = st.f.attrs.get("content_digest", "")
    by_name: dict[str, list[int]] = {}
    for i, vid in enumerate(feats.ids):
        by_name.setdefault(vid.rsplit("/", 1)[1], []).append(i)

    def member(i: int, line: str, what: str):
        """(cache video index, clip positions) of one saved member line."""
        clips = [c for c in line.strip().split(";") if c]
        video = clips[0].split(",")[0].split("/", 1)[0] if clips else ""
        found = by_name.get(video, [])
        if len(found) != 1:
            why = "is not among the cache's ok " + part + " videos" if not found else "names several videos"
            raise FeatureImportError(f"episode {i}: {what} video {video or '(empty line)'} {why} ({folder})")
        vid = found[0]
        if not names[vid].replace("\n", ""):
            raise FeatureImportError(f"episode {i}: {what} video {feats.ids[vid]} was imported without clip names (no "
                                     "clip_names.txt in its folder): saved episodes name clips by them")
        where = {name: k for k, name in enumerate(names[vid].split("\n"))}
        try:
            pos = [where[c.split(",")[0].split("/", 1)[1]] for c in clips]
        except (KeyError, IndexError):
            raise FeatureImportError(f"episode {i}: {what} video {feats.ids[vid]}: a saved clip is not one of its "
                                     "clips in the cache") from None
        return vid, pos

    episodes, positions, used = [], [], {}
    for i in tqdm(nums, unit="episode", disable=not progress, desc=f"import {folder.name}"):
        ep_members = {}
        for side in ("support", "target"):
            x = _saved(folder, f"{side}_set", i)
            labels = _saved(folder, f"{side}_labels", i).astype(np.int64)
            lines_path = folder / f"{side}_frame_names_{i}.txt"
            if not lines_path.is_file():
                raise FeatureImportError(f"{lines_path}: missing (episode {i} is incomplete)")
            lines = [ln for ln in lines_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            if not (len(lines) == len(labels) == len(x)):
                raise FeatureImportError(f"episode {i}: {len(x)} {side} feature sequences, {len(labels)} labels "
                                         f"and {len(lines)} frame-name lines ({folder})")
            ep_members[side] = []
            for line, label, seq in zip(lines, labels, x):
                vid, pos = member(i, line, side)
                stored = feats.x[int(feats.first[vid, 0]) + np.asarray(pos)]
                if stored.shape != seq.shape or not np.allclose(stored, seq, rtol=1e-5, atol=1e-6):
                    diff = np.abs(stored - seq).max() if stored.shape == seq.shape else "shape"
                    raise FeatureImportError(f"episode {i}: the saved features of {side} video {feats.ids[vid]} "
                                             f"differ from the imported ones (max |difference| {diff}): the "
                                             "episodes belong to other features")
                ep_members[side].append((int(label), vid, pos))
        n = len({lab for lab, _, _ in ep_members["support"]})
        rows = []
        for lab in sorted({lab for lab, _, _ in ep_members["support"]}):
            rows.append([m for side in ("support", "target") for m in ep_members[side] if m[0] == lab])
        classes = [{feats.classes[vid] for _, vid, _ in r} for r in rows]
        for lab, cs in enumerate(classes):
            if len(cs) != 1:
                raise FeatureImportError(f"episode {i}: label {lab} holds videos of classes {', '.join(sorted(cs))}: "
                                         "its labels disagree with the class folders")
        if len({c for cs in classes for c in cs}) != n:
            raise FeatureImportError(f"episode {i}: two labels name one class: its labels disagree with the class "
                                     "folders")
        shots = {sum(m[0] == lab for m in ep_members["support"]) for lab in range(n)}
        if len({len(r) for r in rows}) != 1 or len(shots) != 1 or \
                not sorted({m[0] for m in ep_members["target"]}) == sorted({m[0] for m in ep_members["support"]}) \
                == list(range(n)):
            raise FeatureImportError(f"episode {i}: its classes have different numbers of support or query videos, "
                                     "or its labels are not 0 .. N-1")
        episodes.append([[used.setdefault(vid, len(used)) for _, vid, _ in r] for r in rows])
        positions.append([[pos for _, _, pos in r] for r in rows])
    k_shot = len(ep_members["support"]) // n
    ids = feats.ids[list(used)]
    eps, pos = np.asarray(episodes, np.int32), np.asarray(positions, np.int32)
    meta = dict(source=str(folder.resolve()), part=part, n_way=n, k_shot=k_shot,
                q_query=eps.shape[2] - k_shot, count=len(eps), clips=pos.shape[-1], cache_content=content)
    save_sequences(out, ids, eps, pos, meta)
    return dict(path=str(out), **meta)
