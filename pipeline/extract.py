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

import ctypes
import json
import os
import platform
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch

from .backbones.mfnet import MFNet3D, random_mfnet, sha256
from .datasets import VideoEntry
from .store import CacheMismatch, FeatureStore, StoreWriter, VideoResult, merge, read_settings, settings_diff
from .video import Preprocess, Sampling, normalize_batch, read_clips_or_reason, view_seed

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ExtractSettings:
    """Everything that determines the stored features; a cache is only reused or resumed when
    these match exactly."""

    sampling: Sampling = Sampling()
    preprocess: Preprocess = Preprocess()
    views: int = 1
    seed: int = 0              # crops of views >= 1, and the random-init network without weights
    flip: bool = True
    layer: str = "tail"
    dtype: str = "float16"
    compression: str = "lzf"
    precision: str = "fp32"
    weights: str = "random"    # sha256 of the weights file, or "random"

    def __post_init__(self):
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype!r}")
        if self.compression not in ("none", "lzf", "gzip"):
            raise ValueError(f"compression must be none, lzf or gzip, got {self.compression!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["backbone"] = "MFNet3D"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ExtractSettings":
        """Back from a cache's (or checkpoint's) recorded settings."""
        d = {k: v for k, v in d.items() if k != "backbone"}
        return cls(**dict(d, sampling=Sampling(**d["sampling"]), preprocess=Preprocess(**d["preprocess"])))


def load_backbone(weights: str | None, seed: int = 0) -> tuple[MFNet3D, dict]:
    """The network and what to record about it."""
    if weights:
        model = MFNet3D.from_checkpoint(weights)
        info = dict(weights_file=Path(weights).name, weights_path=str(Path(weights).resolve()),
                    weights_sha256=sha256(weights))
    else:
        warnings.warn("no --weights given: using a RANDOMLY INITIALISED MFNet (seed %d). Features are only "
                      "good for demos and tests; pass the Kinetics-400 checkpoint for real results." % seed,
                      stacklevel=2)
        model = random_mfnet(seed)
        info = dict(weights_file=None, weights_sha256="random", random_init_seed=seed)
    return model.eval(), info


def parse_shard(shard: str | None) -> tuple[int, int]:
    """`i/N` from the option, else from torchrun (RANK/WORLD_SIZE) or a Slurm array, else 0/1."""
    if shard:
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like i/N (e.g. 0/4), got {shard!r}") from None
    elif "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        i, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    elif "SLURM_ARRAY_TASK_COUNT" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        i = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        n = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    else:
        i, n = 0, 1
    if not 0 <= i < n:
        raise ValueError(f"shard index {i} is not in 0..{n - 1}")
    return i, n


def shard_path(out: Path, i: int, n: int) -> Path:
    return out if n == 1 else out.with_name(f"{out.stem}.shard-{i}-of-{n}{out.suffix}")


def pick_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device != "cpu":
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device("cpu")


class _Reader:
    """Decodes whole parts in `workers` threads (inline when 0). OpenCV decodes and resizes without
    holding the GIL, so threads decode in parallel without shipping each clip between processes
    (processes cost ~3 ms more per video on the demo, pickling 1.8 MB of clips through a pipe)."""

    def __init__(self, workers: int, settings: ExtractSettings):
        self.settings = settings
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="decode") if workers > 0 else None

    def submit(self, entries) -> list[Future]:
        """Starts decoding `entries`: one future per video, giving (VideoClips or None, reason)."""
        s = self.settings
        args = [(e.path, s.sampling, s.preprocess, s.views, view_seed(e.id, s.seed), s.flip) for e in entries]
        if self.pool is not None:
            return [self.pool.submit(read_clips_or_reason, *a) for a in args]
        done = [Future() for _ in args]
        for f, a in zip(done, args):
            f.set_result(read_clips_or_reason(*a))
        return done

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of giving it back to the system.

    A CPU forward of MFNet allocates and frees activations of tens of MB, above glibc's mmap threshold:
    each was mapped fresh and page-faulted in again on every batch (28-43 thousand faults per batch of
    8), a sixth of the bf16 forward's time on 2 cores. Costs about 100 MB more peak memory. Returns
    False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, (1 << 31) - 1))


class BatchForward:
    """Batched backbone forward returning float32 maps on the CPU."""

    def __init__(self, model: MFNet3D, device: torch.device, settings: ExtractSettings, channels_last: bool):
        self.model = model.to(device)
        self.device = device
        self.layer = settings.layer
        self.amp = PRECISIONS[settings.precision]
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        if channels_last:
            self.model = self.model.to(memory_format=self.memory_format)
        if device.type == "cpu":
            retain_freed_memory()
            # normalize_batch's value for every uint8 level of every channel, (1, 256, 3): one table
            # lookup per value (cv2.LUT) gives the same numbers as its three passes, 2.7x faster
            levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256, 1).expand(1, 1, 1, 256, 3)
            self.levels = normalize_batch(levels).permute(0, 2, 3, 4, 1).reshape(1, 256, 3).numpy()

    def normalize(self, clips: np.ndarray) -> torch.Tensor:
        """uint8 (B, F, H, W, 3) RGB -> float32 (B, 3, F, H, W) on the device, as `normalize_batch`."""
        if self.device.type == "cuda":  # ship uint8 (4x smaller), normalise on the GPU
            return normalize_batch(torch.from_numpy(clips).pin_memory().to(self.device, non_blocking=True))
        rows = cv2.LUT(clips.reshape(-1, clips.shape[-2], 3), self.levels)   # (B*F*H, W, 3) float32
        return torch.from_numpy(rows.reshape(clips.shape)).permute(0, 4, 1, 2, 3)

    @torch.inference_mode()
    def __call__(self, clips: np.ndarray) -> np.ndarray:
        """uint8 (B, F, H, W, 3) clips -> float32 (B, 768, t, h, w) maps."""
        x = self.normalize(clips).contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            y = self.model.forward_features(x, self.layer)
        return y.float().contiguous().cpu().numpy()


def pool_maps(maps: np.ndarray) -> np.ndarray:
    """(n, C, t, h, w) clip maps -> (n, C) float32: the cache's pooled view, a spatio-temporal mean."""
    return maps.reshape(len(maps), maps.shape[1], -1).mean(-1, dtype=np.float32)


def _compute_part(group, decoded, forward, batch_size, bar):
    """Features for one part: videos' clips batched across videos, batches confined to the part."""
    results, queue, outputs = [], [], []

    def run(n):
        batch = np.concatenate([c for c in queue[:n]])
        del queue[:n]
        outputs.append(forward(batch))

    for (entry, order), (vc, reason) in zip(group, decoded):
        r = VideoResult(entry.id, entry.class_name, entry.part, entry.label, order)
        n = 0
        if vc is None:
            r.status, r.reason = "failed", reason
        else:
            v, c = vc.clips.shape[:2]
            r.n_views, r.frame_indices, r.n_frames, n = v, vc.indices, vc.n_frames, v * c
            flat = vc.clips.reshape(n, *vc.clips.shape[2:])  # (views*clips, F, H, W, 3) uint8, view-major
            queue.extend(flat[i:i + 1] for i in range(n))
            while len(queue) >= batch_size:
                run(batch_size)
        results.append((r, n))
        bar.update(1)
    if queue:
        run(len(queue))
    maps = np.concatenate(outputs) if outputs else None
    pos = 0
    for r, n in results:
        if n:
            r.maps = maps[pos:pos + n]
            r.pooled = pool_maps(r.maps)
            pos += n
    return [r for r, _ in results]


def extract(entries: list[VideoEntry], out, settings: ExtractSettings, model: MFNet3D, model_info: dict, *,
            batch_size: int = 8, workers: int = 1, device: str = "auto", shard: str | None = None,
            part_size: int = 32, overwrite: bool = False, channels_last: bool = False,
            progress: bool = True, extra_provenance: dict | None = None) -> dict:
    """Extract `entries` into `out` (or this shard's file). Returns a summary dict."""
    from tqdm import tqdm

    i, n = parse_shard(shard)
    target = shard_path(Path(out), i, n)
    target.parent.mkdir(parents=True, exist_ok=True)
    wanted = settings.as_dict()
    parts_dir = target.with_name(target.name + ".parts")
    if target.exists():
        have = read_settings(target)
        if have == wanted and not overwrite:
            return dict(path=str(target), status="up to date", videos=len(entries))
        if not overwrite:
            raise CacheMismatch(_mismatch(target, have, wanted))
        target.unlink()
    if parts_dir.exists():
        have = json.loads((parts_dir / "settings.json").read_text()) if (parts_dir / "settings.json").exists() else None
        if overwrite or have is None:
            shutil.rmtree(parts_dir)
        elif have != wanted:
            raise CacheMismatch(_mismatch(parts_dir, have, wanted))
    parts_dir.mkdir(exist_ok=True)
    (parts_dir / "settings.json").write_text(json.dumps(wanted, sort_keys=True))

    indexed = list(zip(entries, range(len(entries))))
    groups = [indexed[k:k + part_size] for k in range(0, len(indexed), part_size)]
    mine = [k for k in range(len(groups)) if k % n == i]
    todo = [k for k in mine if not (parts_dir / f"part-{k:06d}.h5").exists()]
    provenance = dict(model_info, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      torch=torch.__version__, h5py=h5py.__version__, numpy=np.__version__,
                      opencv=cv2.__version__, python=platform.python_version(),
                      shard=f"{i}/{n}", **(extra_provenance or {}))
    dev = pick_device(device)
    forward = BatchForward(model, dev, settings, channels_last)
    frames = settings.sampling.frames
    reader = _Reader(workers, settings)
    # On CUDA the workers decode the next part while the GPU computes this one. On CPU the backbone
    # already uses every core, and decoding beside it slowed both (the two compute threads wait for
    # each other whenever a decoder takes one of their cores); there the next part is decoded, on
    # all cores, while this one is written.
    overlap = dev.type == "cuda"
    total = sum(len(groups[k]) for k in todo)
    clips_done = failed = 0
    bar = tqdm(total=total, unit="video", disable=not progress, desc=f"extract {target.name}")
    try:
        nxt = reader.submit([e for e, _ in groups[todo[0]]]) if todo else None
        map_shape = forward(np.zeros((1, frames, settings.preprocess.crop, settings.preprocess.crop, 3),
                                     np.uint8)).shape[1:]
        t0 = time.perf_counter()
        for j, k in enumerate(todo):
            decoded = [f.result() for f in nxt]
            following = [e for e, _ in groups[todo[j + 1]]] if j + 1 < len(todo) else None
            if overlap and following:
                nxt = reader.submit(following)
            results = _compute_part(groups[k], decoded, forward, batch_size, bar)
            if not overlap and following:
                nxt = reader.submit(following)
            clips_done += sum(0 if r.maps is None else len(r.maps) for r in results)
            failed += sum(r.status != "ok" for r in results)
            tmp = parts_dir / f"part-{k:06d}.h5.tmp"
            w = StoreWriter(tmp, wanted, provenance, map_shape, frames)
            for r in results:
                w.add(r)
            w.close()
            os.replace(tmp, parts_dir / f"part-{k:06d}.h5")
            bar.set_postfix(clips_s=f"{clips_done / (time.perf_counter() - t0):.1f}", failed=failed)
    finally:
        bar.close()
        reader.close()
    seconds = time.perf_counter() - t0
    expect = [o for k in mine for _, o in groups[k]]
    count = merge([parts_dir / f"part-{k:06d}.h5" for k in mine], target, wanted, expect)
    shutil.rmtree(parts_dir)
    with FeatureStore(target) as store:
        failures, rows = store.failures(), store.f["features"].shape[0]
    return dict(path=str(target), status="written", videos=count, resumed_parts=len(mine) - len(todo),
                clips=int(rows), computed_clips=clips_done, seconds=seconds,
                clips_per_s=clips_done / seconds if seconds > 0 else 0.0,
                bytes=target.stat().st_size, failures=failures)


def _mismatch(path, have, wanted) -> str:
    if have is None:
        return f"{path} exists but is not a feature cache made by this tool; use --overwrite to replace it"
    detail = "; ".join(f"{k}: cache {have.get(k)!r} vs asked {wanted.get(k)!r}" for k in settings_diff(have, wanted))
    return f"{path} was made with other settings ({detail}); use --overwrite to replace it or choose another --out"
