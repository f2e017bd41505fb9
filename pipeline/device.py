"""Where tensors go: the one choice of device for both stages."""
from __future__ import annotations

import os

import torch

from .errors import ConfigError


def pick_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device != "cpu":
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device("cpu")
