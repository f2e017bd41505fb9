"""Reading clips out of video files: frame-index sampling, sequential decoding, MFNet preprocessing.

Frame indices are computed from the real number of decodable frames, never trusted blindly from the
container header: a file whose header promises more frames than it holds is re-sampled from the
frames that exist (see `read_clips`).
"""
from __future__ import annotations

import functools
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..errors import ConfigError, PipelineError

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov")

# MFNet-3D (Chen et al., ECCV 2018) preprocessing as applied by the authors' PyTorch code
# (cypw/PyTorch-MFNet, network/config.py + data/image_transforms.py): frames are converted BGR->RGB,
# resized with cv2.INTER_LINEAR, cropped, scaled to [0, 1] by /255, then normalised per channel with
# the "MXNet default" mean = (124, 117, 104) / 255 and std = 1 / (0.0167 * 255), i.e.
# value = (x / 255 - mean) / std.
MFNET_MEAN = (124 / 255, 117 / 255, 104 / 255)
MFNET_STD = (1 / (0.0167 * 255),) * 3


class VideoError(PipelineError):
    """A video that cannot be used; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


# ---------------------------------------------------------------- frame-index sampling

@dataclass(frozen=True)
class Sampling:
    """How clips are placed in a video.

    segments: the paper's rule. The video is cut into `clips` equal segments; inside segment t the
      `frames` indices are spread uniformly: floor(t*L + (j + 0.5) * L / F) for L = n / T. A segment
      shorter than F frames therefore repeats frames (nearest-frame upsampling), never crashes.
    dense: windows of `frames` indices `step` apart, starting every `stride` frames (default: one
      window length, i.e. non-overlapping). When the windows do not reach the end, one more window
      is aligned to the last frame so the whole video is covered. A video shorter than one window
      gives one window whose indices past the end repeat the last frame.
    """

    mode: str = "segments"
    clips: int = 3
    frames: int = 16
    step: int = 1
    stride: int | None = None

    def __post_init__(self):
        if self.mode not in ("segments", "dense"):
            raise ConfigError(f"sampling.mode must be 'segments' or 'dense', got {self.mode!r}")
        for name in ("clips", "frames", "step"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sampling.{name} must be >= 1, got {getattr(self, name)}")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"sampling.stride must be >= 1, got {self.stride}")

    def indices(self, n_frames: int) -> np.ndarray:
        """(n_clips, frames) int64 frame indices for a video of `n_frames` frames."""
        if n_frames < 1:
            raise ValueError("a video needs at least one frame")
        if self.mode == "segments":
            return segment_indices(n_frames, self.clips, self.frames)
        return dense_indices(n_frames, self.frames, self.step, self.stride)


def segment_indices(n_frames: int, clips: int, frames: int) -> np.ndarray:
    seg = n_frames / clips
    t = np.arange(clips)[:, None]
    j = np.arange(frames)[None, :]
    idx = np.floor(t * seg + (j + 0.5) * seg / frames).astype(np.int64)
    return np.minimum(idx, n_frames - 1)


def dense_indices(n_frames: int, frames: int, step: int = 1, stride: int | None = None) -> np.ndarray:
    span = (frames - 1) * step + 1
    stride = stride or frames * step
    starts = list(range(0, max(n_frames - span, 0) + 1, stride))
    if starts[-1] + span < n_frames:  # tail not covered: one more window flush with the end
        starts.append(n_frames - span)
    idx = np.array(starts)[:, None] + step * np.arange(frames)[None, :]
    return np.minimum(idx, n_frames - 1).astype(np.int64)


# ---------------------------------------------------------------- preprocessing

@dataclass(frozen=True)
class Preprocess:
    """Resize then crop, as MFNet was trained: `resize` is (w, h) for mode 'fixed' (paper: 256x256)
    or the shorter side for mode 'short'."""

    resize_mode: str = "fixed"
    resize: int = 256
    crop: int = 112

    def __post_init__(self):
        if self.resize_mode not in ("fixed", "short"):
            raise ConfigError(f"preprocess.resize_mode must be 'fixed' or 'short', got {self.resize_mode!r}")
        if self.crop > self.resize:
            raise ConfigError(f"preprocess.crop ({self.crop}) is larger than preprocess.resize ({self.resize})")

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        if self.resize_mode == "fixed":
            return self.resize, self.resize
        if width < height:
            return self.resize, int(self.resize * height / width)
        return int(self.resize * width / height), self.resize

    def resize_frame(self, bgr: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """BGR uint8 (H, W, 3) -> RGB uint8 resized; only rows y0:y1, cols x0:x1 of it when `box` is
        (y0, y1, x0, x1). The colour swap comes after the resize: both are per-channel exact, and
        the region is smaller than the frame."""
        h, w = bgr.shape[:2]
        size = self.resized_size(w, h)
        box = box or (0, size[1], 0, size[0])
        if size == (w, h):
            out = bgr[box[0]:box[1], box[2]:box[3]]
        else:
            out = resize_region(bgr, size, box)
        return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)


def resize_region(img: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """Rows y0:y1, cols x0:x1 of cv2.resize(img, size, INTER_LINEAR), bit for bit, computing little more
    than that region (a 112 crop of a 256x256 frame costs a third of the whole resize)."""
    plan = _region_plan(img.shape[1], img.shape[0], *size, *box)
    if plan is None:
        return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)[box[0]:box[1], box[2]:box[3]]
    rows, cols, out_size, (oy, ox) = plan
    out = cv2.resize(img[rows, cols], out_size, interpolation=cv2.INTER_LINEAR)
    return out[oy:oy + box[1] - box[0], ox:ox + box[3] - box[2]]


def _axis_cut(n_src: int, n_dst: int, lo: int, hi: int) -> tuple[slice, int, int]:
    """Source slice, output length and offset of `lo` in it, for output pixels lo:hi of one axis.

    Linear resizing reads output pixel d from source position (d + 0.5) * n_src / n_dst - 0.5. Cut
    where both sides are whole periods (n_src / g source pixels <-> n_dst / g output pixels, g = gcd),
    the ratio and therefore every pixel's source position and weights stay the same; the margin keeps
    the edge clamping of the cut piece away from the wanted pixels."""
    g = math.gcd(n_src, n_dst)
    per_src, per_dst = n_src // g, n_dst // g
    margin = 2 + n_dst // n_src
    a, b = max(0, (lo - margin) // per_dst), min(g, -(-(hi + margin) // per_dst))
    return slice(a * per_src, b * per_src), (b - a) * per_dst, lo - a * per_dst


@functools.lru_cache(maxsize=1024)
def _region_plan(src_w: int, src_h: int, dst_w: int, dst_h: int, y0: int, y1: int, x0: int, x1: int):
    """The cut for `resize_region`, or None (resize whole frames) if this OpenCV build does not give the
    identical pixels on a random frame of this geometry: checked once per geometry, so another build
    can only make it slower, never different."""
    rows, height, oy = _axis_cut(src_h, dst_h, y0, y1)
    cols, width, ox = _axis_cut(src_w, dst_w, x0, x1)
    img = np.random.default_rng(0).integers(0, 256, (src_h, src_w, 3), dtype=np.uint8)
    full = cv2.resize(img, (dst_w, dst_h), interpolation=cv2.INTER_LINEAR)[y0:y1, x0:x1]
    part = cv2.resize(img[rows, cols], (width, height), interpolation=cv2.INTER_LINEAR)
    if not np.array_equal(full, part[oy:oy + y1 - y0, ox:ox + x1 - x0]):
        return None
    return rows, cols, (width, height), (oy, ox)


@dataclass(frozen=True)
class Crop:
    """Where one clip is cut from its resized frames; identical for all frames of the clip."""

    y: int
    x: int
    flip: bool = False


def center_crop(height: int, width: int, size: int) -> Crop:
    # round() as in the authors' CenterCrop
    return Crop(int(round((height - size) / 2.0)), int(round((width - size) / 2.0)))


def random_crop(height: int, width: int, size: int, rng: np.random.Generator, flip: bool = True) -> Crop:
    y = int(rng.integers(0, height - size + 1))
    x = int(rng.integers(0, width - size + 1))
    return Crop(y, x, bool(flip and rng.random() < 0.5))


def clip_crops(height: int, width: int, size: int, clips: int, views: int, seed: int, flip: bool) -> list[list[Crop]]:
    """[view][clip] crops of (height, width) resized frames: view 0 centred, view v >= 1 drawn from a
    generator seeded by (seed, v, clip)."""
    return [[center_crop(height, width, size) if v == 0 else
             random_crop(height, width, size, np.random.default_rng([seed, v, c]), flip)
             for c in range(clips)] for v in range(views)]


def crop_box(crops: list[list[Crop]], size: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the part of the resized frame that the crops cover."""
    flat = [c for row in crops for c in row]
    return (min(c.y for c in flat), max(c.y for c in flat) + size,
            min(c.x for c in flat), max(c.x for c in flat) + size)


def normalize(clip_rgb: np.ndarray) -> np.ndarray:
    """uint8 (F, H, W, 3) RGB -> float32 (3, F, H, W) normalised as MFNet expects."""
    x = clip_rgb.astype(np.float32) / 255.0
    x = (x - np.array(MFNET_MEAN, np.float32)) / np.array(MFNET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2))


def normalize_constants(device="cpu") -> tuple:
    """(scale, shift) of `normalize_batch` on `device`: (x/255 - mean)/std as one multiply-add,
    computed on the CPU, then moved (the same values everywhere). Kept by a caller that normalises
    batch after batch on CUDA, where moving them each time would wait for the device."""
    import torch
    scale = 1.0 / (255.0 * torch.tensor(MFNET_STD))
    shift = -torch.tensor(MFNET_MEAN) / torch.tensor(MFNET_STD)
    return scale.to(device), shift.to(device)


def normalize_batch(clips_rgb, constants: tuple | None = None):
    """torch uint8 (B, F, H, W, 3) RGB -> float32 (B, 3, F, H, W), the same arithmetic as `normalize`
    (used by extraction: clips stay uint8, 4x smaller, until batched, and on CUDA until on the device).
    `constants`: `normalize_constants(clips_rgb.device)`, when kept."""
    scale, shift = constants or normalize_constants(clips_rgb.device)
    return clips_rgb.float().mul_(scale).add_(shift).permute(0, 4, 1, 2, 3)


def cut_clip(frames: dict[int, np.ndarray], idx: np.ndarray, crop: Crop, size: int) -> np.ndarray:
    """Stack the frames `idx` (resized RGB) cropped by `crop` -> uint8 (F, size, size, 3)."""
    clip = np.stack([frames[int(i)][crop.y:crop.y + size, crop.x:crop.x + size] for i in idx])
    return np.ascontiguousarray(clip[:, :, ::-1]) if crop.flip else clip


# ---------------------------------------------------------------- decoding

@dataclass
class VideoClips:
    """What `read_clips` returns for one video."""

    clips: np.ndarray            # (views, n_clips, 3, F, crop, crop) float32, or uint8 (views, n_clips, F, crop, crop, 3) if raw
    indices: np.ndarray          # (n_clips, F) frame indices into the decoded frames
    n_frames: int                # frames that really decoded
    header_frames: int           # what the container claimed
    fps: float
    size: tuple[int, int]        # original (width, height)
    crops: list = field(default_factory=list)  # [view][clip] Crop


def open_video(path) -> cv2.VideoCapture:
    # One decoding thread per file: extraction decodes several files in parallel (its own threads), and
    # FFmpeg's own threads spend ~30% more CPU on frames this small (measured on the demo videos).
    return cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])


def probe(path) -> tuple[int, float, int, int]:
    """(header frame count, fps, width, height); raises VideoError for a file OpenCV cannot open."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(path, "file does not exist")
    if path.stat().st_size == 0:
        raise VideoError(path, "empty file (0 bytes)")
    cap = open_video(path)
    try:
        if not cap.isOpened():
            raise VideoError(path, "not a readable video (OpenCV could not open it)")
        return (int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), float(cap.get(cv2.CAP_PROP_FPS) or 0.0),
                int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    finally:
        cap.release()


def decode_frames(path, wanted: set[int], preprocess: Preprocess, box_for=None, through: int = -1):
    """Decode sequentially, converting and resizing only the `wanted` frames, and of each only the
    region `box_for(height, width)` of the resized frame (whole frames without `box_for`).

    Returns ({index: resized RGB region}, number of frames decoded, resized (height, width)). Stops
    once every wanted frame is in hand and frame `through` is decoded (or the video ends); memory is
    bounded by the wanted frames.
    """
    cap = open_video(path)
    if not cap.isOpened():
        raise VideoError(path, "not a readable video (OpenCV could not open it)")
    out: dict[int, np.ndarray] = {}
    last = max(max(wanted) if wanted else -1, through)
    i, shape, box = 0, None, None
    try:
        while i <= last:
            if not cap.grab():  # grab() decodes; retrieve() does the colour conversion
                break
            if i in wanted:
                ok, bgr = cap.retrieve()
                if not ok or bgr is None:
                    break
                if bgr.ndim == 2:
                    bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
                w, h = preprocess.resized_size(bgr.shape[1], bgr.shape[0])
                if shape is None:
                    shape, box = (h, w), box_for(h, w) if box_for else None
                elif shape != (h, w):
                    raise VideoError(path, f"frame size changes mid-video (frame {i} resizes to {w}x{h}, "
                                           f"earlier frames to {shape[1]}x{shape[0]})")
                out[i] = preprocess.resize_frame(bgr, box)
            i += 1
    finally:
        cap.release()
    return out, i, shape


def count_frames(path) -> int:
    cap = open_video(path)
    n = 0
    try:
        while cap.grab():
            n += 1
    finally:
        cap.release()
    return n


def truncation(path) -> str:
    """'' or why the file is shorter than its container says: an AVI's RIFF header declares its
    length, and an MP4/MOV's top-level boxes declare theirs. OpenCV reports no decoding damage, and a
    cut file decodes with its last frames concealed; this is the cheap check that catches that case
    (a few header reads). Other containers are not checked."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:4] == b"RIFF":
            declared = int.from_bytes(head[4:8], "little") + 8
            return "" if size >= declared else \
                f"file truncated: {size} of the {declared} bytes its RIFF header declares (the last frames may be damaged)"
        if head[4:8] not in (b"ftyp", b"moov", b"mdat", b"free", b"wide"):
            return ""
        pos = 0
        while pos + 8 <= size:
            f.seek(pos)
            box = f.read(16)
            n, kind = int.from_bytes(box[:4], "big"), box[4:8]
            if n == 1:
                n = int.from_bytes(box[8:16], "big")
            if n == 0:           # the last box runs to the end of the file
                return ""
            if n < 8 or pos + n > size:
                return (f"file truncated: its '{kind.decode('latin-1')}' box at byte {pos} declares {n} bytes, "
                        f"{size - pos} remain (the last frames may be damaged)")
            pos += n
    return ""


def view_seed(video_id: str, seed: int) -> int:
    """A per-video seed that does not depend on Python's randomised str hash."""
    return zlib.crc32(video_id.encode()) ^ seed


def read_clips(path, sampling: Sampling, preprocess: Preprocess, views: int = 1, seed: int = 0,
               flip: bool = True, raw: bool = False) -> VideoClips:
    """Sample and preprocess the clips of one video, for `views` crops of every clip.

    View 0 is the center crop; view v >= 1 is a random crop (+ horizontal flip with p = 0.5 when
    `flip`), drawn from a generator seeded by (seed, v, clip) so re-running gives the same crops.
    If the container header overstates or understates the frame count, the decodable frames are
    counted and the indices recomputed from that count (a second sequential pass; rare in practice).
    Checking costs decoding the frames after the last wanted one (about a sixth of a video at T=3).
    """
    header, fps, width, height = probe(path)
    n = header
    if n <= 0:
        n = count_frames(path)
    if n <= 0:
        raise VideoError(path, "no decodable frames")
    size, idx = preprocess.crop, sampling.indices(n)

    def crops_for(h, w):   # of the current `idx`, which a second pass below may change
        return clip_crops(h, w, size, len(idx), views, seed, flip)

    def box_for(h, w):
        return crop_box(crops_for(h, w), size)

    # one frame past the header's count is tried: if it decodes, the header understates (common in
    # webm) and the frames are counted, so no part of the video is left out of the clips
    frames, decoded, shape = decode_frames(path, set(idx.ravel().tolist()), preprocess, box_for, through=n)
    if decoded > n or len(frames) < len(set(idx.ravel().tolist())):
        n = decoded if decoded < n else count_frames(path)
        if n <= 0:
            raise VideoError(path, "no decodable frames (truncated or corrupt)")
        idx = sampling.indices(n)
        frames, decoded, shape = decode_frames(path, set(idx.ravel().tolist()), preprocess, box_for)
        if len(frames) < len(set(idx.ravel().tolist())):
            raise VideoError(path, f"frames stop decoding unpredictably after {decoded} of {header} frames")
    crops = crops_for(*shape)
    y0, _, x0, _ = crop_box(crops, size)   # the frames hold only this region
    clips = np.stack([np.stack([cut_clip(frames, idx[c], Crop(cr.y - y0, cr.x - x0, cr.flip), size)
                                for c, cr in enumerate(row)]) for row in crops])
    if not raw:
        clips = np.stack([np.stack([normalize(c) for c in view]) for view in clips])
    return VideoClips(clips, idx, n, header, fps, (width, height), crops)


def read_clips_or_reason(path, sampling: Sampling, preprocess: Preprocess, views: int, seed: int,
                         flip: bool) -> tuple[VideoClips | None, str]:
    """`read_clips(..., raw=True)` for decoding workers: (clips, "") or (None, why the file is unusable)."""
    try:
        return read_clips(path, sampling, preprocess, views, seed, flip, raw=True), ""
    except VideoError as e:
        return None, e.reason
    except Exception as e:  # noqa: BLE001 - a decoder crash on one file must not stop the run
        return None, f"{type(e).__name__}: {e}"
