from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .matching import StepMatcher, StudyDefaults, StudyOptions, redefault, symmetric_chamfer


@register("chamfer")
class ChamferMatcher(StepMatcher):
    """Chamfer++ (Bertrand, Kalantidis and Tolias, "Rethinking matching-based few-shot action recognition",
    2023; temporal_matching `MatchingBasedFewShotModel` with `ChamferMatching` both ways): all ordered
    triples of clips, each projected by Linear + LayerNorm (1152); a query's tuples matched jointly
    against all tuples of the class's K shots: half the sum of the mean over query tuples of the best
    support tuple and the mean over support tuples of the best query tuple; times a learnt weight (0.1)
    and a fixed temperature (100). At 8 clips that is 56 triples a video. `tuples=consecutive` (our
    variant, 6 triples) is much cheaper."""

    @dataclass
    class Options(StudyDefaults):
        tuple_length: int = redefault(StudyOptions, "tuple_length", 3)
        joint: bool = redefault(StudyOptions, "joint", True)

    def match(self, sims: torch.Tensor) -> torch.Tensor:
        return symmetric_chamfer(sims)
