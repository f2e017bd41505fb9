"""Temporal matchers of the field on step sequences: what they share.

Each compares the steps of a query with the steps of each support video through the matrix of their
cosine similarities, S (..., M, N, K, Uq, Us), and reduces it in its own way (`match`). They read the
cache's pooled clip vectors in temporal order, (T, D) per video, or with `per_step` each clip's t
temporal positions, (T * t, D).

The matching study (Bertrand, Kalantidis and Tolias, "Rethinking matching-based few-shot action
recognition", 2023; jbertrand89/temporal_matching, `MatchingBasedFewShotModel`) wraps every matcher
the same way, and `StudyOptions` are that wrapping, option by option:
- `tuple_length`, `tuples`: steps become tuples of steps, concatenated: all ordered tuples
  (`itertools.combinations` of the step indices, theirs) or consecutive ones (our variant);
- `projection`: Linear + LayerNorm on each step or tuple (their `r2+1d_fc` backbone; 0: none);
- the cosine of their `utils.cos_sim`: q.s / (|q| |s| + 0.01);
- `joint`: a class's K shots concatenated along the support axis into one matrix (their
  `video_to_class_matching joint`); otherwise each shot is matched and the K scores averaged;
- the score times a weight (learnable, `learn_weight`) times a fixed `temperature`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations

import torch
from torch import nn

from ...errors import ConfigError
from . import Head, option

SIMS_BUDGET = 2 ** 26          # similarity values scored per call (256 MB of float32); more: in blocks


@dataclass
class SequenceOptions:
    """The options of every head that reads sequences: how many clips, at what time resolution."""
    clips: int = option(8, "sequence length T: clips per video, one from each of T segments (a cache "
                           "with fewer repeats them in order)", low=1)
    per_step: bool = option(False, "read each clip's temporal positions (the cache's per-step view): "
                                   "T x t steps")


@dataclass
class TemperatureOptions:
    """The scores times `weight` times `temperature` (the matching study's two temperatures)."""
    weight: float = option(1.0, "multiplier of the scores; a parameter when learn_weight (the matching study: 0.1)",
                           above=0)
    learn_weight: bool = option(False, "learn the weight (the matching study: true)")
    temperature: float = option(1.0, "fixed multiplier of the scores (the matching study: 100)", above=0)


@dataclass
class StudyOptions(TemperatureOptions, SequenceOptions):
    """The matching study's wrapping of a matcher (see the module's docstring)."""
    projection: int = option(0, "Linear + LayerNorm of each step or tuple to this size (the matching study: 1152; "
                                "0: none)", low=0)
    tuple_length: int = option(1, "steps per tuple", low=1)
    tuples: str = option("all", "which tuples: all ordered ones (combinations, the study's) or consecutive ones "
                                "(our variant)", choices=("all", "consecutive"))
    joint: bool = option(False, "match a query against a class's K shots concatenated (else: each shot, "
                                "scores averaged)")


def redefault(cls, name: str, value):
    """Option `name` of the options class `cls` with another default (same help and range)."""
    return field(default=value, metadata=cls.__dataclass_fields__[name].metadata)


@dataclass
class StudyDefaults(StudyOptions):
    """The matching study's values (its README's Chamfer++ command: projection 1152, learnt weight 0.1,
    fixed temperature 100; the per-head values it tuned are in scripts it links to, not in its repository)."""
    projection: int = redefault(StudyOptions, "projection", 1152)
    weight: float = redefault(StudyOptions, "weight", 0.1)
    learn_weight: bool = redefault(StudyOptions, "learn_weight", True)
    temperature: float = redefault(StudyOptions, "temperature", 100.0)


@lru_cache(maxsize=64)      # built once per shape, not in every encode (the returned tensor is only read)
def step_tuples(length: int, size: int, which: str = "all", head: str = "matching") -> torch.Tensor:
    """(U, size) step indices of the tuples of `size` steps of a `length`-step sequence, in the order
    of `itertools.combinations` (all) or by start (consecutive); `head` names the head in the error."""
    if size > length:
        raise ConfigError(f"head {head}: tuple_length {size} is longer than the sequence ({length} steps); use a "
                          "smaller tuple_length or more clips")
    if which == "consecutive":
        return torch.arange(length - size + 1)[:, None] + torch.arange(size)
    return torch.tensor(list(combinations(range(length), size))).view(-1, size)


def scaled(head: Head, o: TemperatureOptions) -> None:
    """Gives `head` its score multiplier: a parameter `weight` when learnt, else a number."""
    head.weight = nn.Parameter(torch.tensor(float(o.weight))) if o.learn_weight else o.weight


class StepMatcher(Head):
    """Steps (or tuples, projected) per video in `encode`; scores = `match(S)` over the K shots (averaged,
    or jointly), times the weight and temperature. Scores are logits, trained with cross-entropy (the
    matching study's and OTAM's loss)."""

    batched = True
    kind = "logits"
    loss = "ce"
    Options = StudyOptions
    eps = 0.01                # the epsilon of utils.cos_sim (few-shot-action-recognition, temporal_matching)

    def __init__(self, options=None, in_dim: int | None = None):
        super().__init__(options, in_dim)
        o = self.options
        self.name = getattr(type(self), "registered_name", type(self).__name__)
        if not o.per_step:          # tuples longer than the sequence fail here, not in the first episode
            step_tuples(o.clips, o.tuple_length, o.tuples, self.name)
        if o.projection:
            self.fc = nn.Linear(o.tuple_length * in_dim, o.projection)
            self.layer_norm = nn.LayerNorm(o.projection)
        scaled(self, o)

    def steps(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) steps -> (B, U, E): the steps or tuples, projected."""
        o = self.options
        if o.tuple_length > 1 or o.tuples != "all":
            x = x[:, step_tuples(x.shape[1], o.tuple_length, o.tuples, self.name)].flatten(-2)     # (B, U, l * D)
        return self.layer_norm(self.fc(x)) if o.projection else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) steps -> (B, U, E + 1): each step or tuple as a unit vector, then its norm."""
        x = self.steps(x)
        norm = x.norm(dim=-1, keepdim=True)
        return torch.cat([x / norm.clamp_min(1e-12), norm], -1)

    def similarities(self, support: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """support (..., N, K, V, E + 1), queries (..., M, U, E + 1) -> S (..., M, N, K, U, V), the cosine
        with the authors' epsilon."""
        sims = torch.einsum("...mud,...nkvd->...mnkuv", queries[..., :-1], support[..., :-1])
        if self.eps:
            norms = queries[..., -1][..., :, None, None, :, None] * support[..., -1][..., None, :, :, None, :]
            sims = sims * (norms / (norms + self.eps))
        return sims

    def scores(self, support: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        lead = support.shape[:-4]
        per_episode = queries.shape[-3:-1].numel() * support.shape[-4:-1].numel()
        block = max(1, SIMS_BUDGET // per_episode)
        if lead and lead[0] > block:       # many episodes at once: in blocks, to bound the memory
            return torch.cat([self.scores(support[i:i + block], queries[i:i + block])
                              for i in range(0, lead[0], block)])
        sims = self.similarities(support, queries)                                 # (..., M, N, K, U, V)
        if self.options.joint:
            scores = self.match(sims.movedim(-3, -2).flatten(-2))                  # (..., M, N, U, K * V)
        else:
            scores = self.match(sims).mean(-1)
        return scores * self.weight * self.options.temperature

    def match(self, sims: torch.Tensor) -> torch.Tensor:
        """(..., Uq, Us) step similarities -> (...) similarity of the two sequences."""
        raise NotImplementedError


def chamfer(sims: torch.Tensor) -> torch.Tensor:
    """(..., U, V) -> (...): the mean over rows of each row's best cell (`ChamferMatching`, one way)."""
    return sims.amax(-1).mean(-1)


def symmetric_chamfer(sims: torch.Tensor) -> torch.Tensor:
    """(..., U, V) -> (...): the two one-way Chamfer similarities, averaged."""
    return 0.5 * (chamfer(sims) + chamfer(sims.transpose(-1, -2)))
