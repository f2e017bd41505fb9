import torch

from . import EmbeddingHead, register


@register("mean")
class MeanHead(EmbeddingHead):
    """Order-blind baseline: the average of the pooled clip vectors (a prototypical network on
    frozen features). It has no parameters; training it is a no-op."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)              # (B, T, 768) -> (B, 768)
