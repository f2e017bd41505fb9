from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import option, prototypes, register
from .matching import SequenceOptions, StepMatcher, StudyOptions, redefault


@register("mean")
class MeanHead(StepMatcher):
    """Two published means of a video's steps.

    form=prototype (the default): the seed paper's order-blind baseline, a prototypical network on
    frozen features: the average of the clip vectors, the class prototype the mean of its K video
    vectors, the score the cosine to it. Parameter-free unless given a projection.
    form=matching: the matching study's mean (temporal_matching `MeanMatching`): over S, the sum over
    the support's steps averaged over the query's, the K shots' scores averaged; with its projection
    and temperatures (`projection=1152 weight=0.1 learn_weight=true temperature=100`) it is that study's
    `mean` model, trained with cross-entropy."""

    @dataclass
    class Options(StudyOptions):
        clips: int = redefault(SequenceOptions, "clips", 3)
        form: str = option("prototype", "prototype: the cosine to the class's mean video vector (the seed paper); "
                                        "matching: the matching study's mean over S", choices=("prototype", "matching"))

    @classmethod
    def scoring(cls, options) -> tuple[str, str]:
        plain = options.weight * options.temperature == 1 and not options.learn_weight
        return ("cosine", "circle") if options.form == "prototype" and plain else ("logits", "ce")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.options.form == "prototype":
            return self.steps(x).mean(1)                 # (B, L, D) -> (B, E): the video vector
        return super().encode(x)

    def as_query(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=-1) if self.options.form == "prototype" else z

    def scores(self, support: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        if self.options.form == "prototype":            # (..., N, K, E), (..., M, E) unit -> (..., M, N) cosines
            return queries @ prototypes(support).transpose(-1, -2) * self.weight * self.options.temperature
        return super().scores(support, queries)

    def match(self, sims: torch.Tensor) -> torch.Tensor:
        return sims.sum(-1).mean(-1)
