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


# CPU flags of native half-precision matrix instructions: without them torch emulates bf16 / fp16
# convolutions, measured 50x slower than fp32 for MFNet on an AVX2-only AMD EPYC (0.3 vs 15.7 clips/s)
NATIVE_HALF = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def slow_half_precision(precision: str, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when `precision` (bf16, fp16) would run emulated on this CPU; False where it is native or
    the CPU's flags cannot be read (not Linux)."""
    if precision not in NATIVE_HALF:
        return False
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return False
    return flags is not None and not any(f in flags for f in NATIVE_HALF[precision])
