import torch

from . import register
from .matching import StepMatcher


@register("diag")
class DiagonalMatcher(StepMatcher):
    """Step-aligned matching: the mean cosine of the query's and the support's t-th steps (a baseline of
    Bertrand et al., "Rethinking matching-based few-shot action recognition", 2023)."""

    def match(self, sims: torch.Tensor) -> torch.Tensor:
        return sims.diagonal(dim1=-2, dim2=-1).mean(-1)
