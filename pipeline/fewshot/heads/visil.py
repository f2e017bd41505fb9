import torch
from torch import nn

from ...errors import ConfigError
from . import register
from .matching import StepMatcher, StudyDefaults, chamfer


@register("visil")
class ViSiLMatcher(StepMatcher):
    """ViSiL adapted to few-shot matching (Kordopatis-Zilos et al., ICCV 2019, as the matching study ran
    it: temporal_matching `VisilFCN` then `ChamferMatching` both ways): S and its transpose each go
    through ViSiL's network (conv 3x3 32, max-pool 2, ReLU, conv 3x3 64, max-pool 2, ReLU, conv 3x3 128,
    conv 1x1 1, no biases, hardtanh), and the score is the mean of the two Chamfer similarities of
    the filtered matrices (best support cell per query row, averaged). The study's released per-head
    scripts are not in its repository: the symmetric Chamfer after the network is read from its code's
    comment on that case."""

    Options = StudyDefaults

    def __init__(self, options=None, in_dim: int | None = None):
        super().__init__(options, in_dim)
        if not self.options.per_step and self.options.clips < 4:
            raise ConfigError(f"visil pools S twice by 2: it needs at least 4 steps, got clips={self.options.clips}")
        self.fcn = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(64, 128, 3, padding=1, bias=False), nn.Conv2d(128, 1, 1, bias=False), nn.Hardtanh())

    def filtered(self, sims: torch.Tensor) -> torch.Tensor:
        """(..., U, V) -> (..., U // 4, V // 4)"""
        out = self.fcn(sims.reshape(-1, 1, *sims.shape[-2:]))
        return out.view(*sims.shape[:-2], *out.shape[-2:])

    def match(self, sims: torch.Tensor) -> torch.Tensor:
        return 0.5 * (chamfer(self.filtered(sims)) + chamfer(self.filtered(sims.transpose(-1, -2))))
