"""Accuracy over episodes and over training seeds, with intervals that say which noise they cover,
and paired comparisons of methods on the same episodes and seeds.

Two sources of noise: which test episodes were drawn (the paper's 95% CI, 1.96 std / sqrt(E)) and
which training run produced the checkpoint (seeds). Every method is scored on the same fixed
episodes, so the spread of the seed means holds no episode noise; the two are added in quadrature.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats


def mean_ci(acc: np.ndarray) -> tuple[float, float]:
    """Mean and 95% CI half-width 1.96 * std / sqrt(n) over episodes (sample std, ddof=1)."""
    acc = np.asarray(acc, np.float64)
    return float(acc.mean()), float(1.96 * acc.std(ddof=1) / math.sqrt(len(acc))) if len(acc) > 1 else 0.0


def summarize(acc: np.ndarray, runs: int) -> dict:
    """One checkpoint's per-episode accuracies (runs * per_run,) -> mean, episode CI, per-run means
    and their spread."""
    mean, ci = mean_ci(acc)
    per_run = np.asarray(acc).reshape(runs, -1).mean(1)
    return dict(accuracy=mean, ci95=ci, episodes=int(len(acc)), runs=runs, run_means=per_run.tolist(),
                run_std=float(per_run.std(ddof=1)) if runs > 1 else 0.0,
                run_min=float(per_run.min()), run_max=float(per_run.max()))


def _t95(dof: int) -> float:
    return float(stats.t.ppf(0.975, dof))


def over_seeds(acc: np.ndarray) -> dict:
    """acc (S, E): S training seeds' checkpoints on the same E episodes -> the mean over seeds and
    episodes, the seeds' spread, and a 95% interval: with S >= 2, the half-widths of the seed term
    t(S-1) * std(seed means) / sqrt(S) and of the episode term 1.96 * std(episode accuracies averaged
    over seeds) / sqrt(E) added in quadrature; with one seed, the episode term alone."""
    acc = np.asarray(acc, np.float64)
    s, e = acc.shape
    seed_means = acc.mean(1)
    episode_term = mean_ci(acc.mean(0))[1]
    seed_std = float(seed_means.std(ddof=1)) if s > 1 else 0.0
    seed_term = _t95(s - 1) * seed_std / math.sqrt(s) if s > 1 else 0.0
    return dict(accuracy=float(acc.mean()), ci95=math.hypot(seed_term, episode_term), seeds=s,
                seed_means=seed_means.tolist(), seed_std=seed_std, seed_min=float(seed_means.min()),
                seed_max=float(seed_means.max()), seed_ci95=seed_term, episode_ci95=episode_term,
                noise="training seeds and test episodes" if s > 1 else "test episodes only (one training seed)")


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """a, b (S, E): two methods on the same episodes, row s of each trained with the same seed.
    Difference a - b, its 95% CI and a two-sided p-value. The standard error adds in quadrature the
    spread of the per-seed differences (sqrt(S) seeds, t with S-1 degrees of freedom) and the episode
    noise of the seed-averaged differences; with one seed only the latter (normal approximation)."""
    d = np.atleast_2d(np.asarray(a, np.float64)) - np.atleast_2d(np.asarray(b, np.float64))
    s, e = d.shape
    per_seed, per_episode = d.mean(1), d.mean(0)
    se_episode = per_episode.std(ddof=1) / math.sqrt(e) if e > 1 else 0.0
    se_seed = per_seed.std(ddof=1) / math.sqrt(s) if s > 1 else 0.0
    se = math.hypot(se_seed, se_episode)
    mean = float(d.mean())
    if se == 0:
        p, crit = 1.0, 0.0
    elif s > 1:
        p, crit = float(2 * stats.t.sf(abs(mean / se), s - 1)), _t95(s - 1)
    else:
        p, crit = math.erfc(abs(mean / se) / math.sqrt(2)), 1.96
    return dict(diff=mean, ci95=crit * se, p_value=p, seeds=s, per_seed_diff=per_seed.tolist(),
                noise="training seeds and test episodes" if s > 1 else "test episodes only (one training seed)")


def format_p(p: float) -> str:
    """A p-value for a table: two significant digits, or a bound below 1e-4 (never "0")."""
    return "p < 1e-4" if p < 1e-4 else f"p = {p:.2g}"
