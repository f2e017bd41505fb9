from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import torch
from torch import nn

from ...errors import ConfigError
from . import Head, option, register, show
from .matching import SequenceOptions, TemperatureOptions, scaled


# per video: the attention of one 75-query 5-way episode is 375 x tuples^2 floats per tuple size;
# at 1,024 tuples (560 of size 3) that is about 0.5 GB a tensor, 2,300 (3 clips x 8 steps) took 16 GB
MAX_TUPLES = 1024


@register("trx")
class TemporalRelationalCrossTransformer(Head):
    """Temporal-relational cross-transformer (TRX, Perrett et al., CVPR 2021; tobyperrett/trx
    `TemporalCrossTransformer`, `CNN_TRX`) on frozen clip vectors: the steps plus a sinusoidal positional
    encoding x 0.1, with dropout 0.1 in training; all ordered tuples of 2 and 3 steps give keys
    (Linear + LayerNorm) and values (Linear); each query tuple attends over all tuples of a class's K
    shots to build a query-specific prototype; the score is minus the squared distance of the query's
    values to it, averaged over the tuples, then over the tuple sizes: logits, trained with
    cross-entropy. `weight` and `temperature` are the matching study's additions (1: TRX's)."""

    kind = "logits"
    loss = "ce"

    @dataclass
    class Options(TemperatureOptions, SequenceOptions):
        tuple_sizes: tuple[int, ...] = option((2, 3), "tuple cardinalities, comma-separated", low=1)
        dim: int = option(1152, "size of the keys and values", low=1)
        dropout: float = option(0.1, "dropout on the steps plus positional encoding, in training", low=0, below=1)

    def __init__(self, options=None, in_dim: int | None = None):
        super().__init__(options, in_dim)
        o = self.options
        if not o.per_step and max(o.tuple_sizes) > o.clips:
            raise ConfigError(f"head trx: tuple size {max(o.tuple_sizes)} is larger than the sequence ({o.clips} clips); use "
                              "smaller tuple_sizes or more clips")
        self.keys = nn.ModuleList(nn.Linear(s * in_dim, o.dim) for s in o.tuple_sizes)
        self.values = nn.ModuleList(nn.Linear(s * in_dim, o.dim) for s in o.tuple_sizes)
        self.key_norms = nn.ModuleList(nn.LayerNorm(o.dim) for _ in o.tuple_sizes)
        self.dropout = nn.Dropout(o.dropout)
        scaled(self, o)
        self.length = None         # the sequence length L seen: T clips, or T x t steps with per_step

    def _layout(self, length: int) -> None:
        """Tuples and positional encoding for sequences of `length` steps, made on the first call."""
        if self.length == length:
            return
        if max(self.options.tuple_sizes) > length:
            raise ConfigError(f"head trx: tuple size {max(self.options.tuple_sizes)} is larger than the sequence "
                              f"({length} steps); use smaller tuple_sizes or more clips")
        count = sum(math.comb(length, s) for s in self.options.tuple_sizes)
        if count > MAX_TUPLES:
            raise ConfigError(f"head trx: {count} tuples of sizes {show(self.options.tuple_sizes)} from {length} steps "
                              f"(more than {MAX_TUPLES}); use fewer clips, per_step=false or tuple_sizes=2")
        self.tuples = [torch.tensor(list(combinations(range(length), s))) for s in self.options.tuple_sizes]
        self.position = 0.1 * sinusoid(length, self.in_dim)  # TRX's 0.1
        self.length = length

    def _load_from_state_dict(self, state_dict, prefix, *args):
        state_dict.pop(prefix + "position", None)    # a buffer in checkpoints of the first version; recomputed
        super()._load_from_state_dict(state_dict, prefix, *args)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) steps -> (B, tuples, 2 * dim): each tuple's key then value, all sizes in a row."""
        self._layout(x.shape[1])
        x = self.dropout(x + self.position.to(x))
        out = []
        for idx, key, value, norm in zip(self.tuples, self.keys, self.values, self.key_norms):
            t = x[:, idx].flatten(-2)                                           # (B, n_s, s * D)
            out.append(torch.cat([norm(key(t)), value(t)], -1))
        return torch.cat(out, 1)

    def scores(self, support: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """support (N, K, tuples, 2d), queries (M, tuples, 2d) -> (M, N). The squared distance of a query
        tuple's value v to its prototype p = A V (A: attention over the class's support tuples, V their
        values) is expanded as |v|^2 - 2 A (V v) + A (V V^T) A^T, so no (M, N, tuples, d) prototype is
        built: two matmuls over d per tuple size, then small ones over the tuples (4x faster at T = 8)."""
        d, start, total = self.options.dim, 0, 0
        for idx in self.tuples:
            s = support[:, :, start:start + len(idx)].flatten(1, 2)             # (N, V, 2d): shots pooled
            q = queries[:, start:start + len(idx)]                              # (M, U, 2d)
            att = torch.softmax(torch.einsum("mud,nvd->mnuv", q[..., :d], s[..., :d]) / math.sqrt(d), -1)
            cross = torch.einsum("mud,nvd->mnuv", q[..., d:], s[..., d:])       # (M, N, U, V) value products
            gram = s[..., d:] @ s[..., d:].transpose(1, 2)                      # (N, V, V)
            p_sq = (torch.einsum("mnuv,nvw->mnuw", att, gram) * att).sum(-1)    # |p|^2 (M, N, U)
            dist = q[:, None, :, d:].square().sum(-1) - 2 * (att * cross).sum(-1) + p_sq
            total = total - dist.mean(-1)
            start += len(idx)
        return total / len(self.tuples) * self.weight * self.options.temperature


def sinusoid(length: int, dim: int) -> torch.Tensor:
    """(length, dim) sinusoidal positional encoding (Vaswani et al. 2017), in float64."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, dtype=torch.float64)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe
