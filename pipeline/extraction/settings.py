"""What determines the stored features; the cache records it, and a cache is reused only when it matches."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import ConfigError
from ..store import COMPRESSION
from .video import Preprocess, Sampling

PRECISIONS = ("fp32", "bf16", "fp16")


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
            raise ConfigError(f"views must be >= 1, got {self.views}")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"dtype must be float16 or float32, got {self.dtype!r}")
        if self.compression not in COMPRESSION:
            raise ConfigError(f"compression must be one of {', '.join(COMPRESSION)}, got {self.compression!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["backbone"] = "MFNet3D"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ExtractSettings":
        """Back from a cache's (or checkpoint's) recorded settings."""
        d = {k: v for k, v in d.items() if k != "backbone"}
        return cls(**dict(d, sampling=Sampling(**d["sampling"]), preprocess=Preprocess(**d["preprocess"])))
