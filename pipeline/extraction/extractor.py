"""Stage one: run MFNet over every clip of a split and write the feature cache.

Crash safety: the videos are cut into fixed groups ("parts") of `part_size` videos. Each part is
computed with its own batches and written to `<out>.parts/part-XXXXXX.h5` under a temporary name,
then renamed, so after Ctrl-C or kill -9 every part file on disk is complete. A rerun skips the
finished parts and, at the end, the parts are merged into `<out>` (again via a temporary name).
Because batches never span two parts, a resumed run computes exactly the batches an uninterrupted
run would, and the caches are identical. Shard i of N takes parts i, i+N, ...; merging the shard
files gives the same file as a single process.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch

from ..errors import ConfigError
from ..files import atomic_path, atomic_write_text, check_output, exclusive, sha256
from ..store import (SIZE_RATIO, CacheError, CacheMismatch, FeatureStore, StoreWriter, VideoResult, check_settings, pool_maps,
                     read_settings, step_maps)
from ..device import NATIVE_HALF, pick_device, slow_half_precision
from .backbone import Backbone, retain_freed_memory
from .workers import Merger, Workers
from .datasets import VideoEntry
from .settings import ExtractSettings
from .video import truncation


def parse_shard(shard: str | None) -> tuple[int, int]:
    """`i/N` from the option, else from torchrun (RANK/WORLD_SIZE) or a Slurm array, else 0/1."""
    if shard:
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise ConfigError(f"--shard must look like i/N (e.g. 0/4), got {shard!r}") from None
    elif "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        i, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    elif "SLURM_ARRAY_TASK_COUNT" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        i = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        n = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    else:
        i, n = 0, 1
    if n < 1:
        raise ConfigError(f"shard count {n} must be at least 1 (i/N: shard i of N)")
    if not 0 <= i < n:
        raise ConfigError(f"shard index {i} is not in 0..{n - 1}")
    return i, n


def estimated_bytes(settings: ExtractSettings, videos: int) -> int:
    """A lower estimate of a cache's size: segment clips' maps (MFNet: 768 x F/2 x ceil(crop/32)^2) in
    the stored dtype, compressed at the demo's measured ratio (store.SIZE_RATIO), plus the pooled and per-step
    views; 0 for dense sampling, whose clip count depends on the videos' lengths."""
    if settings.sampling.mode != "segments":
        return 0
    t, hw = settings.sampling.frames // 2, -(-settings.preprocess.crop // 32)      # stride-2 stages round up
    maps = 768 * t * hw * hw * (2 if settings.dtype == "float16" else 4)
    maps = maps / SIZE_RATIO[settings.compression]
    return int(videos * settings.sampling.clips * settings.views * (maps + 768 * 4 + t * 768 * 2))


def shard_path(out: Path, i: int, n: int) -> Path:
    return out if n == 1 else out.with_name(f"{out.stem}.shard-{i}-of-{n}{out.suffix}")


def _forward_part(group, decoded, forward, batch_size, bar, maps):
    """One part's videos given to the network (`forward.submit`), their float32 clip maps to go into
    `maps` (rows of the part's decoded clips, in order; there after `forward.wait`): clips batched
    across videos, batches confined to the part. Returns (results, spans): each video's (first row,
    rows) in `maps`, for `write_part`."""
    results, queue, spans, filled = [], [], [], 0

    def run(n):
        nonlocal filled
        forward.submit(queue[:n], maps[filled:filled + n])
        del queue[:n]
        filled += n

    for (entry, order, source), (vc, reason) in zip(group, decoded):
        r = VideoResult(entry.id, entry.class_name, entry.part, entry.label, order, file_sha256=source)
        n = 0
        if vc is None:
            r.status, r.reason = "failed", reason
        else:
            r.warning = truncation(entry.path)
            v, c = vc.clips.shape[:2]
            r.n_views, r.frame_indices, r.n_frames, n = v, vc.indices, vc.n_frames, v * c
            flat = vc.clips.reshape(n, *vc.clips.shape[2:])  # (views*clips, F, H, W, 3) uint8, view-major
            queue.extend(flat[i:i + 1] for i in range(n))
            while len(queue) >= batch_size:
                run(batch_size)
        results.append(r)
        spans.append((spans[-1][0] + spans[-1][1] if spans else 0, n))
        bar.update(1)
    if queue:
        run(len(queue))
    return results, spans


def decoded_rows(decoded) -> int:
    """The clips of a part's decoded videos: the rows of its maps."""
    return sum(vc.clips.shape[0] * vc.clips.shape[1] for vc, _ in decoded if vc is not None)


def _cast(m: np.ndarray, dtype: str) -> np.ndarray:
    """`m.astype(dtype)`, bit for bit (tested), by torch's F16C cast at a tenth of numpy's time; in
    pieces of torch's grain size, so that it runs in this thread alone: a larger cast is split across
    torch's OpenMP threads, which then wait for cores the decoders hold (a 30x slowdown seen here)."""
    if m.dtype == np.dtype(dtype):
        return m
    src, out = torch.from_numpy(np.ascontiguousarray(m)).view(-1), torch.empty(m.shape, dtype=getattr(torch, dtype))
    flat = out.view(-1)
    for i in range(0, len(src), 32768):
        flat[i:i + 32768] = src[i:i + 32768]
    return out.numpy()


EXPONENT_BITS = {"float16": (np.uint16, 0x7C00), "float32": (np.uint32, 0x7F800000)}


def _finish_part(results, maps, dtype):
    """The stored views of each video's float32 maps: maps in `dtype`, pooled and per-step vectors.
    A video whose maps are not finite in `dtype` is recorded as failed, not stored."""
    for r, m in zip(results, maps):
        if m is None:
            continue
        r.maps = _cast(m, dtype)
        uint, exponent = EXPONENT_BITS[dtype]       # all ones: inf or NaN; 20x faster than np.isfinite on float16
        finite = (r.maps.view(uint).reshape(len(m), -1) & exponent).max(1) != exponent
        if not finite.all():     # a NaN stored would become a score later; record why instead
            r.status, r.maps = "failed", None
            r.reason = (f"the network gave non-finite values (NaN or inf in {dtype}) for clip row(s) "
                        f"{np.flatnonzero(~finite).tolist()}")
        else:
            r.pooled, r.steps = pool_maps(m), step_maps(m)
    return results


def write_part(maps, path, results, wanted: dict, provenance: dict, map_shape, frames: int) -> int:
    """One part file, from its videos' results and float32 maps (in a worker process): returns how many
    of its videos are recorded as failed."""
    results = _finish_part(results, maps, wanted["dtype"])
    # h5py can crash the process on a full disk: refuse while there is still room to say so
    check_output(path, "part file", need_bytes=sum(r.maps.nbytes + r.pooled.nbytes for r in results
                                                   if r.maps is not None))
    with atomic_path(path) as tmp, StoreWriter(tmp, wanted, provenance, map_shape, frames) as w:
        for r in results:
            w.add(r)
    return sum(r.status != "ok" for r in results)


def extract_features(entries: list[VideoEntry], out, settings: ExtractSettings, backbone: Backbone, *,
                     batch_size: int = 8, workers: int = 1, device: str = "auto", shard: str | None = None,
                     part_size: int = 32, overwrite: bool = False, channels_last: bool = False,
                     progress: bool = True, extra_provenance: dict | None = None,
                     allow_duplicates: bool = False) -> dict:
    """Extract `entries` into `out` (or this shard's file). Returns a summary dict."""
    i, n = parse_shard(shard)
    target = shard_path(Path(out), i, n)
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(target, "feature cache"):
        return _extract_locked(entries, target, i, n, settings, backbone, batch_size, workers, device, part_size,
                               overwrite, channels_last, progress, extra_provenance, allow_duplicates)


def _extract_locked(entries, target, i, n, settings, backbone, batch_size, workers, device, part_size, overwrite,
                    channels_last, progress, extra_provenance, allow_duplicates) -> dict:
    from tqdm import tqdm

    dev = pick_device(device)                # a device that is not there: refused before any work
    wanted = settings.as_dict()
    indexed = list(zip(entries, range(len(entries))))
    groups = [indexed[k:k + part_size] for k in range(0, len(indexed), part_size)]
    mine = [k for k in range(len(groups)) if k % n == i]
    # parts and the merged cache are on disk together while merging: twice the cache
    check_output(target, "feature cache", need_bytes=2 * estimated_bytes(settings, sum(len(groups[k]) for k in mine)))
    sources = file_digests([e.path for k in mine for e, _ in groups[k]], workers)
    groups = _with_sources(groups, mine, sources)
    videos = [[e.id, e.part, e.label, src] for k in mine for e, _, src in groups[k]]   # this shard's, in order
    duplicates = check_duplicates(videos, allow_duplicates)
    # what the part files are cut from: resuming needs the same settings, videos (and files) and part size
    identity = dict(settings=wanted, part_size=part_size, videos=videos)
    parts_dir = target.with_name(target.name + ".parts")
    fix = "use --overwrite to replace it or choose another --out"
    if target.exists():
        have = read_settings(target)
        held = _cache_videos(target) if have == wanted else None
        change = describe_change(held, videos) if held is not None else None
        if have == wanted and not change:
            return dict(path=str(target), status="up to date", videos=len(videos),
                        files_compared=any(h[3] for h in held))
        if not overwrite:
            check_settings(have, wanted, target, fix)
            raise CacheMismatch(f"{target} was made with the same settings from other videos or files ({change}); "
                                f"{fix}")
        target.unlink()
    if parts_dir.exists():
        have = json.loads((parts_dir / "settings.json").read_text()) if (parts_dir / "settings.json").exists() else {}
        if have != identity:
            if not overwrite:
                check_settings(have.get("settings"), wanted, parts_dir, fix)
                if have.get("part_size") != part_size:
                    raise CacheMismatch(f"{parts_dir} holds the parts of an extraction cut into parts of "
                                        f"{have.get('part_size')} videos, not {part_size}: resume with --part-size "
                                        f"{have.get('part_size')}, or {fix}")
                change = (describe_change(have["videos"], videos) if isinstance(have.get("videos"), list)
                          else "written by an earlier version")
                raise CacheMismatch(f"{parts_dir} holds the parts of an extraction of other videos or files "
                                    f"({change}); {fix}")
            shutil.rmtree(parts_dir)
    _drop_damaged([parts_dir / f"part-{k:06d}.h5" for k in mine])
    todo = [k for k in mine if not (parts_dir / f"part-{k:06d}.h5").exists()]
    # no creation time: the same extraction gives the same bytes, so DVC sees no change
    provenance = dict(backbone.provenance(), torch=torch.__version__, h5py=h5py.__version__, numpy=np.__version__,
                      opencv=cv2.__version__, python=platform.python_version(),
                      shard=f"{i}/{n}", **(extra_provenance or {}), **({"duplicates": duplicates} if duplicates else {}))
    if dev.type == "cpu" and slow_half_precision(settings.precision):
        warnings.warn(f"--precision {settings.precision} on this CPU is emulated (no {' or '.join(NATIVE_HALF[settings.precision])} "
                      "instructions) and can run 50x slower than --precision fp32", stacklevel=2)
    forward = backbone.batch_forward(dev, settings, channels_last)
    retain_freed_memory()         # on every device: the parts' arrays are tens of MB, freed and made again
    frames = settings.sampling.frames
    map_shape = forward(np.zeros((1, frames, settings.preprocess.crop, settings.preprocess.crop, 3), np.uint8)).shape[1:]
    workers = Workers(workers, settings, part_size, map_shape)
    try:            # only now, so that a run refused before it starts leaves nothing to block the next
        parts_dir.mkdir(exist_ok=True)
        atomic_write_text(parts_dir / "settings.json", json.dumps(identity, sort_keys=True))
    except BaseException:
        workers.close()
        raise
    # On a GPU the workers decode the next part while the network computes this one. On CPU the
    # backbone already uses every core, and decoding beside it slowed both (the two compute threads
    # wait for each other whenever a decoder takes one of their cores); there the next part is
    # decoded, on all cores, while this one is written.
    overlap = not forward.on_cpu
    total = sum(len(groups[k]) for k in todo)
    done = dict(clips=0, failed=0)
    bar = tqdm(total=total, unit="video", disable=not progress, desc=f"extract {target.name}")
    expect = {o: e.id for k in mine for e, o, _ in groups[k]}
    unmerged = [parts_dir / f"part-{k:06d}.h5" for k in mine]      # merged in order, as each is on disk
    writes, unwritten = deque(), deque()   # parts being written; parts whose maps may be on the device

    def finish_oldest_write():
        done["failed"] += writes.popleft().result()
        while unmerged and unmerged[0].exists():
            merger.add(unmerged.pop(0))

    def write_computed(keep: int):
        """Writes the parts computed, all but the last `keep`: on a GPU a part's maps are collected
        once the next part's batches are queued, so the device does not idle at each part's end."""
        while len(unwritten) > keep:
            mark, k, maps, buffer, spans, results = unwritten.popleft()
            forward.wait(mark)
            writes.append(workers.write(write_part, maps, buffer, spans, parts_dir / f"part-{k:06d}.h5", results,
                                        wanted, provenance, map_shape, frames))

    # the cache is merged from the parts while they are made, by a process of its own (a second pass
    # at the end cost 10% here, and merging in this process took a core's third on a GPU machine);
    # it appears under its name only when whole
    _remove_temporaries(parts_dir)
    with atomic_path(target) as merged_tmp:
        merger = Merger(merged_tmp, wanted, expect, in_process=workers.workers > 0)
        try:
            nxt = workers.submit([e for e, _, _ in groups[todo[0]]]) if todo else None
            t0 = time.perf_counter()
            for j, k in enumerate(todo):
                part, decoded = nxt, nxt.result()
                following = [e for e, _, _ in groups[todo[j + 1]]] if j + 1 < len(todo) else None
                if overlap and following:
                    nxt = workers.submit(following)
                while len(writes) + len(unwritten) >= workers.in_flight:      # memory stays bounded
                    finish_oldest_write()
                maps, buffer = workers.out(decoded_rows(decoded))
                results, spans = _forward_part(groups[k], decoded, forward, batch_size, bar, maps)
                done["clips"] += len(maps)
                del decoded
                part.release()               # the clips are copied into the batches by now
                unwritten.append((forward.submitted, k, maps, buffer, spans, results))
                del maps
                write_computed(keep=1 if overlap else 0)
                if not overlap and following:            # after the write: it runs beside the decoding
                    nxt = workers.submit(following)
                bar.set_postfix(clips_s=f"{done['clips'] / (time.perf_counter() - t0):.1f}", failed=done["failed"])
            write_computed(keep=0)
            while writes:
                finish_oldest_write()
            for path in unmerged:                   # parts of an earlier run after the last one made now
                merger.add(path)
            merger.close()
        except BaseException:
            merger.abort()
            raise
        finally:
            bar.close()
            workers.close()
            _remove_temporaries(parts_dir)     # of writers stopped mid-part (Ctrl-C)
    seconds = time.perf_counter() - t0
    count = len(expect)
    shutil.rmtree(parts_dir)
    with FeatureStore(target) as store:
        failures, rows = store.failures(), store.f["features"].shape[0]
        warnings = [(store.videos["id"][i], store.videos["warning"][i]) for i in np.flatnonzero(store.videos["warning"])]
    return dict(path=str(target), status="written", videos=count, resumed_parts=len(mine) - len(todo),
                clips=int(rows), computed_clips=done['clips'], seconds=seconds,
                clips_per_s=done['clips'] / seconds if seconds > 0 else 0.0,
                bytes=target.stat().st_size, failures=failures, warnings=warnings)


def _drop_damaged(parts: list[Path]) -> None:
    """Finished part files that cannot be read (a disk fault, a file cut short or overwritten) are
    removed, with a warning naming each, so that they are computed again rather than stopping the
    merge at the end of the run."""
    for path in parts:
        if not path.exists():
            continue
        try:
            with FeatureStore(path):
                pass
        except (CacheError, KeyError, OSError) as e:
            warnings.warn(f"{path} is damaged ({e}); it is computed again", stacklevel=4)
            path.unlink()


def _remove_temporaries(parts_dir: Path) -> None:
    """Part files left half-written by a worker that was stopped (its cleanup never ran)."""
    for tmp in parts_dir.glob("part-*.h5.tmp*"):
        tmp.unlink(missing_ok=True)


def file_digests(paths, workers: int) -> list[str]:
    """sha256 of every video file, `workers` threads at a time (hashlib releases the GIL); about a
    second per GB per core, small beside decoding the same bytes. An unreadable file gets "": its
    decoding fails next and records why."""
    def digest(p):
        try:
            return sha256(p)
        except OSError:
            return ""
    if workers <= 1:
        return [digest(p) for p in paths]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(digest, paths))


def duplicate_groups(videos: list) -> list[list[tuple[str, str]]]:
    """Groups of (id, part) whose files have the same sha256, from [id, part, label, sha256] rows."""
    by_digest = {}
    for vid, part, _, digest in videos:
        if digest:
            by_digest.setdefault(digest, []).append((vid, part))
    return [g for g in by_digest.values() if len(g) > 1]


def check_duplicates(videos: list, allow: bool) -> list[list[str]]:
    """Groups of video ids whose files are byte-identical (the same sha256: copies, or links to one
    file), from [id, part, label, sha256] rows. A group across parts (a test video also in training
    inflates a few-shot result) is an error unless `allow`; one within a part is a warning."""
    groups = duplicate_groups(videos)
    across = [g for g in groups if len({p for _, p in g}) > 1]
    if across and not allow:
        (a, pa), (b, pb) = next(((x, y) for g in across for x in g for y in g if x[1] != y[1]))
        raise CacheMismatch(f"{len(across)} file(s) appear in more than one part, byte for byte (e.g. {a} in {pa} "
                            f"and {b} in {pb}): a video seen in training inflates test accuracy; remove the copies, "
                            "or pass --allow-duplicates to go on (recorded in the cache)")
    within = [g for g in groups if g not in across]
    if within:
        warnings.warn(f"{len(within)} group(s) of byte-identical files within one part (e.g. "
                      f"{', '.join(v for v, _ in within[0])}); recorded in the cache", stacklevel=2)
    return [[v for v, _ in g] for g in groups]


def _with_sources(groups, mine, sources):
    """groups of (entry, order) -> (entry, order, file sha256) for this shard's groups."""
    it, mine = iter(sources), set(mine)
    return [[(e, o, next(it) if k in mine else "") for e, o in g] for k, g in enumerate(groups)]


def _cache_videos(path) -> list:
    """[id, part, label, file sha256] of every video in the cache at `path`, in order."""
    with FeatureStore(path) as st:
        v = st.videos
        return [[a, b, int(c), d] for a, b, c, d in zip(v["id"], v["part"], v["label"], v["file_sha256"])]


def describe_change(have: list, want: list) -> str:
    """'' when the two video lists ([id, part, label, file sha256] each) agree, else what changed:
    videos added, removed, modified (another file's bytes) or moved. A list from a cache written
    before file digests has "" there: only the ids, parts and labels are compared."""
    if not any(h[3] for h in have):
        have, want = [h[:3] for h in have], [w[:3] for w in want]
    if have == want:
        return ""
    old, new = {h[0]: h for h in have}, {w[0]: w for w in want}
    added, removed = [v for v in new if v not in old], [v for v in old if v not in new]
    both = [v for v in new if v in old]
    modified = [v for v in both if len(old[v]) > 3 and old[v][3] != new[v][3]]
    moved = [v for v in both if old[v][1:3] != new[v][1:3]]
    said = [f"{len(x)} {what} ({', '.join(x[:3])}{', ...' if len(x) > 3 else ''})"
            for x, what in ((added, "added"), (removed, "removed"), (modified, "modified"),
                            (moved, "in another part or class")) if x]
    return "; ".join(said) or "the same videos in another order"
