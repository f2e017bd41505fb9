import torch
from torch import nn

from ...errors import ConfigError
from . import register
from .matching import StepMatcher, StudyDefaults, step_tuples


@register("linear")
class LinearMatcher(StepMatcher):
    """Linear matching (Bertrand et al., "Rethinking matching-based few-shot action recognition", 2023;
    temporal_matching `LinearMatching`): a learnt linear function (no bias) of the flattened S,
    inside the study's projection and temperatures. Its size is fixed by the number of steps (or
    tuples) U: U x U weights."""

    Options = StudyDefaults

    def __init__(self, options=None, in_dim: int | None = None):
        super().__init__(options, in_dim)
        o = self.options
        if o.per_step or o.joint:
            raise ConfigError("linear matching has one weight per cell of S, so its size must be known when it is "
                              "built: per_step and joint are not available")
        u = len(step_tuples(o.clips, o.tuple_length, o.tuples))
        self.linear = nn.Linear(u * u, 1, bias=False)

    def match(self, sims: torch.Tensor) -> torch.Tensor:
        return self.linear(sims.flatten(-2))[..., 0]
