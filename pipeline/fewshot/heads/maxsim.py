import torch

from . import register
from .matching import StepMatcher


@register("max")
class MaxMatcher(StepMatcher):
    """The best pair: the highest cosine between any query step and any support step (a baseline of
    Bertrand et al., "Rethinking matching-based few-shot action recognition", 2023)."""

    def match(self, sims: torch.Tensor) -> torch.Tensor:
        return sims.amax((-2, -1))
