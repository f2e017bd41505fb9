import torch
from torch import nn

from . import register


@register("mean")
class MeanHead(nn.Module):
    """Order-blind baseline: the average of the pooled clip vectors (a prototypical network on
    frozen features). It has no parameters; training it is a no-op."""

    kind, consumes = "embedding", "pooled"

    def __init__(self, in_dim: int = 768):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)              # (B, T, 768) -> (B, 768)
