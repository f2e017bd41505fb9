"""Temporal matchers of the field on per-clip sequences: what they share.

Each compares the T steps of a query with the T steps of each support video through the cosine
similarities of their steps, S (..., M, N, K, Tq, Ts), and reduces S in its own way; the K shots of a
class are averaged. They read the cache's pooled clip vectors in temporal order, (T, 768) per video,
or with `per_step` each clip's 8 temporal positions, (T * 8, 768).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from . import Head, option


@dataclass
class SequenceOptions:
    """The options of every head that reads sequences: how many clips, at what time resolution."""
    clips: int = option(8, "sequence length T: clips per video, one from each of T segments (a cache "
                           "with fewer repeats them in order)")
    per_step: bool = option(False, "read each clip's 8 temporal positions (the cache's per-step view): "
                                   "T x 8 steps")

    def __post_init__(self):
        if self.clips < 1:
            raise ConfigError(f"option clips must be >= 1, got {self.clips}")


class StepMatcher(Head):
    """Unit step vectors per video (once, in `encode`); scores = `match(S)` averaged over K."""

    batched = True
    Options = SequenceOptions

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)                                          # (B, T, D), unit steps

    def scores(self, support: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        sims = torch.einsum("...mtd,...nksd->...mnkts", queries, support)     # (..., M, N, K, Tq, Ts)
        return self.match(sims).mean(-1)                                       # (..., M, N)

    def match(self, sims: torch.Tensor) -> torch.Tensor:
        """(..., Tq, Ts) step similarities -> (...) similarity of the two sequences."""
        raise NotImplementedError
