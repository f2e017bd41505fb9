"""The backbone as one value (network, weights file, sha256), and its batched forward pass.

Extraction builds it from `--weights`; predict rebuilds the very same one from what a cache
recorded, and refuses a file whose sha256 differs.
"""
from __future__ import annotations

import ctypes
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from ..errors import PipelineError
from ..files import sha256
from .mfnet import MFNet3D, random_mfnet
from .settings import ExtractSettings
from .video import normalize_batch

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
    """Batched backbone forward returning float32 maps on the CPU."""

    def __init__(self, model: MFNet3D, device: torch.device, settings: ExtractSettings, channels_last: bool):
        self.model = model.to(device)
        self.device = device
        self.on_cpu = device.type == "cpu"     # then it competes with the decoders for the cores
        self.layer = settings.layer
        self.amp = AUTOCAST[settings.precision]
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
