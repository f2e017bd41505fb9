import torch

from . import register
from .matching import StepMatcher, StudyDefaults


@register("max")
class MaxMatcher(StepMatcher):
    """The best pair (Bertrand et al., "Rethinking matching-based few-shot action recognition", 2023;
    temporal_matching `MaxMatching`): the highest cosine between any query step and any support step,
    inside the study's projection and temperatures."""

    Options = StudyDefaults

    def match(self, sims: torch.Tensor) -> torch.Tensor:
        return sims.amax((-2, -1))
