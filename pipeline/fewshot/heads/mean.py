from dataclasses import dataclass

import torch

from . import EmbeddingHead, option, register


@register("mean")
class MeanHead(EmbeddingHead):
    """Order-blind baseline: the average of the pooled clip vectors (a prototypical network on
    frozen features). It has no parameters; training it is a no-op."""

    @dataclass
    class Options:
        clips: int = option(3, "clips per video averaged, one from each of T segments")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)              # (B, T, 768) -> (B, 768)
