import torch

from . import register
from .matching import StepMatcher, StudyDefaults


@register("diag")
class DiagonalMatcher(StepMatcher):
    """Step-aligned matching (Bertrand et al., "Rethinking matching-based few-shot action recognition",
    2023; temporal_matching `DiagonalMatching`): the mean of the diagonal of S, the query's t-th step
    against the support's t-th, inside the study's projection and temperatures."""

    Options = StudyDefaults

    def match(self, sims: torch.Tensor) -> torch.Tensor:
        return sims.diagonal(dim1=-2, dim2=-1).mean(-1)
