import torch

from . import register
from .matching import StepMatcher, symmetric_chamfer


@register("bimhm")
class BidirectionalMeanHausdorff(StepMatcher):
    """Bidirectional mean Hausdorff matching (HyRSM, Wang et al., CVPR 2022) without HyRSM's attention:
    the mean over query steps of the best support step plus the mean over support steps of the best
    query step, halved, as a similarity. HyRSM's logits (`CNN_HyRSM_1shot`: minus the sums of the
    minimum distances, D = 1 - S, over T steps each way) are 2T times this minus 2T: the same ranking.
    HyRSM normalises without an epsilon."""

    eps = 0.0

    def match(self, sims: torch.Tensor) -> torch.Tensor:
        return symmetric_chamfer(sims)
