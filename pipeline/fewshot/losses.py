"""Losses over episode similarities: circle loss (the paper, eq. 12), cross-entropy, MSE (relation)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError


def circle_loss(s_p: torch.Tensor, s_n: torch.Tensor, gamma: float = 128.0, m: float = 0.4) -> torch.Tensor:
    """Circle loss (Sun et al. 2020) with O_p = 1 + m, O_n = -m, Delta_p = 1 - m, Delta_n = m.

    s_p: (B, L) positive similarities, s_n: (B, M) negative ones; returns the mean over the B rows of
    softplus(logsumexp_j gamma a_n (s_n - Delta_n) + logsumexp_i -gamma a_p (s_p - Delta_p)),
    i.e. log(1 + sum_ij exp(...)) computed without overflow. The weights a_p = [O_p - s_p]+ and
    a_n = [s_n - O_n]+ are constants (detached), as in the paper's gradients (eq. 14-15).
    """
    a_p = torch.clamp_min(1 + m - s_p.detach(), 0)
    a_n = torch.clamp_min(s_n.detach() + m, 0)
    logit_p = -gamma * a_p * (s_p - (1 - m))
    logit_n = gamma * a_n * (s_n - m)
    return F.softplus(torch.logsumexp(logit_n, 1) + torch.logsumexp(logit_p, 1)).mean()


def episode_loss(name: str, sims: torch.Tensor, target: torch.Tensor, gamma: float, m: float, scale: float):
    """sims: (n_query, N) query-to-class scores, or (n_query, N, K) query-to-support-video scores for
    the losses in PER_VIDEO; target: (n_query,) class positions."""
    if name == "circle":
        n = sims.shape[1]
        others = (target[:, None] + torch.arange(1, n, device=target.device)) % n            # (n_query, N-1) the other classes
        return circle_loss(sims.gather(1, target[:, None]), sims.gather(1, others), gamma, m)
    if name == "circle_per_video":  # the paper's K-shot form: L = K positives, M = (N-1) K negatives
        q, n, k = sims.shape
        others = (target[:, None] + torch.arange(1, n, device=target.device)) % n
        positives = sims[torch.arange(q), target]                                           # (n_query, K)
        negatives = sims.gather(1, others[:, :, None].expand(-1, -1, k)).flatten(1)         # (n_query, (N-1) K)
        return circle_loss(positives, negatives, gamma, m)
    if name == "ce":
        return F.cross_entropy(scale * sims, target)
    if name == "mse":  # relation networks regress the score to the one-hot target
        return F.mse_loss(sims, F.one_hot(target, sims.shape[1]).float())
    raise ConfigError(f"unknown loss {name!r} ({', '.join(LOSSES)})")


# circle: one positive per query, its class prototype (identical to the paper for 1-shot);
# circle_per_video: the paper's eq. 12 for K > 1, one similarity per support video
LOSSES = ("circle", "circle_per_video", "ce", "mse")
# the kinds of scores (heads' `kind`) each loss can train: circle loss's margins and weights assume
# cosines in [-1, 1] (on minus squared distances every negative gets a zero weight), MSE regresses
# scores to 0 / 1
ACCEPTS = {"circle": ("cosine",), "circle_per_video": ("cosine",), "ce": ("cosine", "probability", "logits"),
           "mse": ("cosine", "probability")}
WHY = {"circle": "circle loss assumes cosine similarities in [-1, 1]: on these scores its weights give the "
                 "negative classes no gradient",
       "mse": "MSE regresses each score to 0 or 1, which unbounded scores need not reach"}


def check_loss(loss: str, head: str, kind: str, own: str) -> None:
    """Refuses a loss that cannot train scores of `kind`, saying why and what to use."""
    if kind not in ACCEPTS[loss]:
        raise ConfigError(f"loss {loss} cannot train head {head}: its scores are {kind}, and "
                          f"{WHY[loss.removesuffix('_per_video')]}; use --loss {own} (its own)")
PER_VIDEO = ("circle_per_video",)     # losses that need each support video scored on its own
