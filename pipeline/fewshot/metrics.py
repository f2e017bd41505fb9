"""Accuracy over episodes with the paper's 95% confidence interval, and paired comparisons."""
from __future__ import annotations

import math

import numpy as np


def mean_ci(acc: np.ndarray) -> tuple[float, float]:
    """Mean and 95% CI half-width 1.96 * std / sqrt(n) over episodes (sample std, ddof=1)."""
    acc = np.asarray(acc, np.float64)
    return float(acc.mean()), float(1.96 * acc.std(ddof=1) / math.sqrt(len(acc))) if len(acc) > 1 else 0.0


def summarize(acc: np.ndarray, runs: int) -> dict:
    """Per-episode accuracies (runs * per_run,) -> mean, CI, per-run means and their spread."""
    mean, ci = mean_ci(acc)
    per_run = np.asarray(acc).reshape(runs, -1).mean(1)
    return dict(accuracy=mean, ci95=ci, episodes=int(len(acc)), runs=runs, run_means=per_run.tolist(),
                run_std=float(per_run.std(ddof=1)) if runs > 1 else 0.0,
                run_min=float(per_run.min()), run_max=float(per_run.max()))


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Paired comparison of two methods on the same episodes: mean difference a - b, its 95% CI,
    and a two-sided p-value (normal approximation of the paired t-test; n is in the thousands)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mean, ci = mean_ci(d)
    se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    p = 1.0 if se == 0 else math.erfc(abs(mean / se) / math.sqrt(2))
    return dict(diff=mean, ci95=ci, p_value=p)
