"""The paper's test protocol: fixed episodes (default 5-way, 15 queries, 600 x 10 runs), mean
accuracy with a 95% confidence interval, computed from per-video work done once."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import heads
from .episodes import fixed_episodes, prototypes
from .features import load
from .metrics import paired, summarize
from .store import CacheMismatch, FeatureStore, settings_diff


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (run `pipeline train`)")
    ck = torch.load(path, weights_only=False)
    head = heads.build(ck["head"], **ck["head_config"])
    head.load_state_dict(ck["state_dict"])
    return head.eval(), ck


@torch.no_grad()
def episode_accuracies(head, feats, episodes: np.ndarray, k_shot: int, chunk: int = 500) -> np.ndarray:
    """(E,) accuracy of every episode (E, N, K+Q). Embedding heads embed each video once and score
    all episodes from the vectors; relation heads project each video's support and query halves of
    the first convolution once and only run the rest of the network per pair."""
    e, n, kq = episodes.shape
    x = torch.from_numpy(np.asarray(feats.x[:, 0], np.float32))
    target = torch.arange(n).repeat_interleave(kq - k_shot)
    if head.kind == "embedding":
        emb = head(x)                                                        # (videos, D)
        unit = F.normalize(emb, dim=-1)          # each query's direction once, not once per episode
        acc = []
        for s in range(0, e, chunk):
            ep = torch.from_numpy(episodes[s:s + chunk])
            protos = prototypes(emb[ep[:, :, :k_shot]])                      # (e, N, D)
            queries = unit[ep[:, :, k_shot:].flatten(1, 2)]                  # (e, N*Q, D)
            pred = (queries @ protos.transpose(1, 2)).argmax(-1)             # cosine scores (e, N*Q, N)
            acc.append((pred == target).float().mean(1))
        return torch.cat(acc).numpy()
    sup = torch.cat([head.project(x[i:i + 256], "s") for i in range(0, len(x), 256)])
    qry = torch.cat([head.project(x[i:i + 256], "q") for i in range(0, len(x), 256)])
    acc = np.empty(e)
    for i, ep in enumerate(torch.from_numpy(episodes)):
        scores = head.relate(sup[ep[:, :k_shot]].mean(1), qry[ep[:, k_shot:].reshape(-1)])
        acc[i] = (scores.argmax(1) == target).float().mean().item()
    return acc


def check_cache(ck: dict, store: FeatureStore, checkpoint) -> None:
    if ck["cache"]["settings_hash"] != store.settings_hash:
        raise CacheMismatch(f"{checkpoint} was trained on a cache with other settings than {store.path} "
                            f"(differs in: {', '.join(settings_diff(ck['cache']['settings'], store.settings))})")


def evaluate(checkpoints, cache, n_way=5, k_shot=1, q_query=15, episodes=600, runs=10, seed=0,
             part="test") -> tuple[list[dict], np.ndarray]:
    """Metrics for each checkpoint on the same fixed episodes, and the (checkpoints, E) accuracies."""
    loaded = [load_checkpoint(c) for c in checkpoints]
    with FeatureStore(cache) as store:
        for (head, ck), path in zip(loaded, checkpoints):
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
        m.update(head=ck["head"], loss=ck["train_config"]["loss"] if ck["state_dict"] else "(none)",
                 checkpoint=str(path), cache=str(cache),
                 cache_settings_hash=settings_hash, n_way=n_way, k_shot=k_shot, q_query=q_query, part=part,
                 seed=seed, best_val=ck.get("best_val"), train_config=ck["train_config"],
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
    path.write_text(json.dumps(result, indent=1))
