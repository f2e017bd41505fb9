import torch

from . import register
from .matching import StepMatcher


@register("bimhm")
class BidirectionalMeanHausdorff(StepMatcher):
    """Bidirectional mean Hausdorff matching (HyRSM, Wang et al., CVPR 2022) without HyRSM's attention:
    the mean over query steps of the best support step plus the mean over support steps of the best
    query step, halved, as a similarity (HyRSM's distance with D = 1 - S is 2 minus twice this)."""

    def match(self, sims: torch.Tensor) -> torch.Tensor:
        return 0.5 * (sims.amax(-1).mean(-1) + sims.amax(-2).mean(-1))
