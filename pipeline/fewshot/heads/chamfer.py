from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from . import Head, option, register
from .matching import SequenceOptions


@register("chamfer")
class ChamferMatcher(Head):
    """Chamfer++ matching (Bertrand, Kalantidis and Tolias, "Rethinking matching-based few-shot action
    recognition", 2023): tuples of consecutive clips, a linear projection and LayerNorm, then the two-way
    mean of best-match cosines between the query's tuples and all tuples of the class's K shots pooled
    together, times a learnable scale."""

    batched = True

    @dataclass
    class Options(SequenceOptions):
        tuple_length: int = option(2, "consecutive clips per tuple")
        dim: int = option(1024, "size of the projected tuples")
        scale: float = option(1.0, "initial multiplier of the similarities")
        learn_scale: bool = option(True, "learn the multiplier (a temperature)")

    def __init__(self, options=None, in_dim: int = 768):
        super().__init__(options)
        o = self.options
        self.proj = nn.Linear(o.tuple_length * in_dim, o.dim)
        self.norm = nn.LayerNorm(o.dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(o.scale)), requires_grad=o.learn_scale)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, 768) steps -> (B, L - l + 1, dim) unit tuple vectors."""
        if self.options.tuple_length > x.shape[1]:
            raise ConfigError(f"head chamfer: tuple_length {self.options.tuple_length} is longer than the sequence "
                              f"({x.shape[1]} steps); use a smaller tuple_length or more clips")
        tuples = x.unfold(1, self.options.tuple_length, 1).transpose(-1, -2).flatten(-2)   # (B, U, l * 768)
        return F.normalize(self.norm(self.proj(tuples)), dim=-1)

    def scores(self, support: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        pooled = support.flatten(-3, -2)                                        # (..., N, K * U, dim)
        sims = torch.einsum("...mud,...nvd->...mnuv", queries, pooled)          # (..., M, N, U, K * U)
        return 0.5 * (sims.amax(-1).mean(-1) + sims.amax(-2).mean(-1)) * self.log_scale.exp()
