"""The paper's test protocol: fixed episodes (default 5-way, 15 queries, 600 x 10 runs), mean
accuracy with a 95% confidence interval, computed from per-video work done once."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..files import atomic_write_text
from ..store import FeatureStore, check_settings
from . import checkpoint
from .episodes import fixed_episodes
from .features import load
from .metrics import paired, summarize

ENCODE_BLOCK = 4096   # videos encoded per call: memory stays bounded for map heads


@torch.no_grad()
def encode_all(head, x: torch.Tensor) -> torch.Tensor:
    """Every video's encoding (videos, ...), computed once."""
    return torch.cat([head.encode(x[i:i + ENCODE_BLOCK]) for i in range(0, len(x), ENCODE_BLOCK)])


@torch.no_grad()
def episode_accuracies(head, feats, episodes: np.ndarray, k_shot: int, chunk: int = 500) -> np.ndarray:
    """(E,) accuracy of every episode (E, N, K+Q): each video is encoded once, then every episode
    is scored from the encodings, `chunk` episodes per call for heads whose scores take a batch."""
    e, n, kq = episodes.shape
    z = encode_all(head, torch.from_numpy(np.asarray(feats.x[:, 0], np.float32)))
    zq = head.as_query(z)
    target = torch.arange(n).repeat_interleave(kq - k_shot)
    step = chunk if head.batched else 1
    acc = []
    for s in range(0, e, step):
        ep = torch.from_numpy(episodes[s:s + step])
        support, queries = z[ep[:, :, :k_shot]], zq[ep[:, :, k_shot:].flatten(1, 2)]    # (b, N, K, ...), (b, N*Q, ...)
        scores = head.scores(support, queries) if head.batched else head.scores(support[0], queries[0])[None]
        acc.append((scores.argmax(-1) == target).float().mean(-1))                  # scores (b, N*Q, N)
    return torch.cat(acc).numpy()


def check_cache(ck, store: FeatureStore, path) -> None:
    check_settings(ck.cache["settings"], store.settings, f"{path} (its training cache)",
                   f"evaluate it on a cache extracted with the same settings as {ck.cache['path']}")


def evaluate(checkpoints, cache, n_way=5, k_shot=None, q_query=15, episodes=600, runs=10, seed=0,
             part="test") -> tuple[list[dict], np.ndarray]:
    """Metrics for each checkpoint on the same fixed episodes, and the (checkpoints, E) accuracies.
    K defaults to the K the checkpoints were trained with (which must then agree)."""
    cks = [checkpoint.load(c) for c in checkpoints]
    if k_shot is None:
        trained = {ck.train_config["k_shot"] for ck in cks}
        if len(trained) > 1:
            raise ConfigError(f"the checkpoints were trained with K = {sorted(trained)}; pass --k-shot to score them "
                              "on the same episodes")
        k_shot = trained.pop()
    loaded = [(ck.build_head(), ck) for ck in cks]
    with FeatureStore(cache) as store:
        for ck, path in zip(cks, checkpoints):
            check_cache(ck, store, path)
        consumes = {h.consumes for h, _ in loaded}
        feats = {c: load(store, part, c, views=1) for c in consumes}
        any_feats = next(iter(feats.values()))
        eps = fixed_episodes(Path(cache), any_feats.ids, any_feats.by_class(), part, n_way, k_shot, q_query,
                             episodes * runs, seed)
        settings_hash = store.settings_hash
    results, accs = [], []
    for (head, ck), path in zip(loaded, checkpoints):
        t0 = time.perf_counter()
        acc = episode_accuracies(head, feats[head.consumes], eps, k_shot)
        m = summarize(acc, runs)
        m.update(head=ck.head, head_options=ck.head_options, loss=ck.train_config["loss"] if ck.state_dict else "(none)",
                 checkpoint=str(path), cache=str(cache),
                 cache_settings_hash=settings_hash, n_way=n_way, k_shot=k_shot, q_query=q_query, part=part,
                 seed=seed, best_val=ck.best_val, train_config=ck.train_config,
                 seconds=time.perf_counter() - t0)
        results.append(m)
        accs.append(acc)
    accs = np.stack(accs)
    best = int(np.argmax([r["accuracy"] for r in results]))
    for i, r in enumerate(results):
        r["vs_best"] = None if i == best else paired(accs[i], accs[best])
    return results, accs


def table(results: list[dict]) -> str:
    """A Markdown table in the paper's style (accuracy % +- 95% CI)."""
    lines = ["| head | loss | N-way K-shot | accuracy (%) | runs min-max | vs best (diff, p) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        vs = "best" if r["vs_best"] is None else f"{100 * r['vs_best']['diff']:+.2f}, p={r['vs_best']['p_value']:.2g}"
        lines.append(f"| {r['head']} | {r['loss']} | {r['n_way']}-way {r['k_shot']}-shot | "
                     f"{100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f} | "
                     f"{100 * r['run_min']:.2f}-{100 * r['run_max']:.2f} | {vs} |")
    return "\n".join(lines)


def write_metrics(path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1))
