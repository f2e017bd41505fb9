"""The backbone as one value (network, weights file, sha256), and its batched forward pass.

Extraction builds it from `--weights`; predict rebuilds the very same one from what a cache
recorded, and refuses a file whose sha256 differs.
"""
from __future__ import annotations

import ctypes
import math
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from ..errors import PipelineError
from ..files import sha256
from .mfnet import MFNet3D, random_mfnet
from .settings import ExtractSettings
from .video import normalize_batch, normalize_constants

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class BackboneError(PipelineError):
    pass


@dataclass
class Backbone:
    model: MFNet3D
    weights_path: str | None     # None: a seeded random network
    sha256: str                  # of the weights file, or "random"
    seed: int = 0                # of the random network

    @classmethod
    def load(cls, weights: str | None, seed: int = 0) -> "Backbone":
        """From a weights file, or a seeded random network (demos and tests only) with a warning."""
        if weights:
            path = str(Path(weights).resolve())
            return cls(MFNet3D.from_checkpoint(weights).eval(), path, sha256(weights), seed)
        warnings.warn("no --weights given: using a RANDOMLY INITIALISED MFNet (seed %d). Features are only "
                      "good for demos and tests; pass the Kinetics-400 checkpoint for real results." % seed,
                      stacklevel=2)
        return cls(random_mfnet(seed).eval(), None, "random", seed)

    @classmethod
    def recorded(cls, settings: dict, provenance: dict, weights: str | None = None) -> "Backbone":
        """The backbone a cache was made with (`settings`, `provenance` as the cache records them);
        `weights` points to the file when it has moved."""
        if settings["weights"] == "random":
            if weights:
                raise BackboneError(f"the features were made by a random-init MFNet, not by {weights}")
            return cls(random_mfnet(settings["seed"]).eval(), None, "random", settings["seed"])
        path = weights or provenance.get("weights_path")
        if not path or not Path(path).is_file():
            raise BackboneError(f"the MFNet weights the features were made with (sha256 {settings['weights'][:12]}...) "
                                f"are not at {path!r}; pass --weights")
        if sha256(path) != settings["weights"]:
            raise BackboneError(f"{path} is not the MFNet checkpoint the features were made with (sha256 differs "
                                f"from {settings['weights'][:12]}...)")
        return cls(MFNet3D.from_checkpoint(path).eval(), str(Path(path).resolve()), settings["weights"])

    def batch_forward(self, device: torch.device, settings: ExtractSettings, channels_last: bool) -> "BatchForward":
        return BatchForward(self.model, device, settings, channels_last)

    def provenance(self) -> dict:
        """What a cache records about the backbone."""
        if self.weights_path is None:
            return dict(weights_file=None, weights_sha256="random", random_init_seed=self.seed)
        return dict(weights_file=Path(self.weights_path).name, weights_path=self.weights_path,
                    weights_sha256=self.sha256)


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
    """Batched backbone forward returning float32 maps on the CPU: `__call__` for one batch at once;
    `submit` and `wait` for a stream of batches, which on CUDA keeps the device busy (`_CudaStaging`)."""

    def __init__(self, model: MFNet3D, device: torch.device, settings: ExtractSettings, channels_last: bool):
        self.model = model.to(device)
        self.device = device
        self.on_cpu = device.type == "cpu"     # then it competes with the decoders for the cores
        self.layer = settings.layer
        self.amp = AUTOCAST[settings.precision]
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.submitted = 0                     # batches given to `submit`: what `wait` counts in
        self.constants = normalize_constants(device)   # moved once: on CUDA a copy per batch waits for the device
        self.staging = _CudaStaging(self) if device.type == "cuda" else None
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
            return normalize_batch(torch.from_numpy(clips).pin_memory().to(self.device, non_blocking=True), self.constants)
        rows = cv2.LUT(clips.reshape(-1, clips.shape[-2], 3), self.levels)   # (B*F*H, W, 3) float32
        return torch.from_numpy(rows.reshape(clips.shape)).permute(0, 4, 1, 2, 3)

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """float32 (B, 3, F, H, W) on the device -> contiguous float32 (B, 768, t, h, w) there."""
        x = x.contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            y = self.model.forward_features(x, self.layer)
        return y.float().contiguous()

    @torch.inference_mode()
    def __call__(self, clips: np.ndarray) -> np.ndarray:
        """uint8 (B, F, H, W, 3) clips -> float32 (B, 768, t, h, w) maps."""
        return self.maps(self.normalize(clips)).cpu().numpy()

    @torch.inference_mode()
    def submit(self, pieces: list[np.ndarray], out: np.ndarray) -> None:
        """One batch made of `pieces` (uint8 (b, F, H, W, 3) each, in order): their maps go to `out`
        (float32, one row a clip). On the CPU at once; on CUDA once `wait` has covered this batch."""
        self.submitted += 1
        if self.staging is None:
            out[...] = self(np.concatenate(pieces))
        else:
            self.staging.submit(self.submitted, pieces, out)

    def wait(self, upto: int | None = None) -> None:
        """Until the maps of the batches submitted so far (or the first `upto`, a value of
        `submitted`) are in their `out`."""
        if self.staging is not None:
            self.staging.wait(self.submitted if upto is None else upto)


def _pinned(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class _CudaStaging:
    """Two batches in flight on a CUDA device, each with its own pinned host buffers (grown to the
    largest batch, then reused: pinning memory per batch costs more than the copy). Batch i+1's clips
    cross to the device on a stream of their own while batch i computes, and batch i's maps come back
    on a third while batch i+1 computes; the host waits only when it needs a buffer back (or `wait`).
    Before, every batch was pinned afresh, copied, computed and brought back while the device idled."""

    def __init__(self, forward: BatchForward):
        self.forward = forward
        self.to_device, self.to_host = torch.cuda.Stream(forward.device), torch.cuda.Stream(forward.device)
        self.free = [_Buffers(), _Buffers()]
        self.busy: deque = deque()          # (batch number, buffers, pinned maps, out), oldest first

    def submit(self, number: int, pieces: list[np.ndarray], out: np.ndarray) -> None:
        if not self.free:
            self._collect_oldest()
        buffers = self.free.pop()
        try:
            clips = buffers.get("clips", (sum(len(p) for p in pieces), *pieces[0].shape[1:]), torch.uint8)
            np.concatenate(pieces, out=clips.numpy())
            with torch.cuda.stream(self.to_device):
                x = clips.to(self.forward.device, non_blocking=True)
            compute = torch.cuda.current_stream(self.forward.device)
            compute.wait_stream(self.to_device)
            x.record_stream(compute)            # made on the copy stream, used (and freed) on this one
            y = self.forward.maps(normalize_batch(x, self.forward.constants))
            maps = buffers.get("maps", tuple(y.shape), torch.float32)
            self.to_host.wait_stream(compute)
            with torch.cuda.stream(self.to_host):
                maps.copy_(y, non_blocking=True)
            y.record_stream(self.to_host)
            buffers.done.record(self.to_host)   # after the copy back, so after this batch's every use
        except BaseException:
            self.free.append(_Buffers())        # not these: a copy may still be using them
            raise
        self.busy.append((number, buffers, maps, out))

    def _collect_oldest(self) -> None:
        _, buffers, maps, out = self.busy.popleft()
        buffers.done.synchronize()
        out[...] = maps.numpy()
        self.free.append(buffers)

    def wait(self, upto: int) -> None:
        while self.busy and self.busy[0][0] <= upto:
            self._collect_oldest()


class _Buffers:
    """One batch's pinned host buffers and the event that says the device is done with them."""

    def __init__(self):
        self.pinned: dict[str, torch.Tensor] = {}
        self.done = torch.cuda.Event(blocking=True)    # the host sleeps while it waits: a spin took a core

    def get(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if name not in self.pinned or len(self.pinned[name]) < nbytes:
            self.pinned[name] = _pinned(nbytes)
        return self.pinned[name][:nbytes].view(dtype).view(shape)
