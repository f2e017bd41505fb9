"""Stage two: episodic training of a head over the cached features."""
from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import heads
from .episodes import EpisodeSampler, cosine_scores, fixed_episodes, prototypes
from .features import SplitFeatures, load
from .losses import LOSSES, episode_loss
from .store import FeatureStore

# name -> (optimizer, lr, lr decay every, decay factor, episodes)
OPTIMIZERS = {
    # The paper's values (SGD, lr 1e-5, x0.1 every 12,000 episodes, 18,000 episodes); they were set
    # for fine-tuning the whole network end to end and barely move a freshly initialised head.
    "paper": ("sgd", 1e-5, 12000, 0.1, 18000),
    # Head-only training on cached features (chosen on the demo cache, see README).
    "head": ("adam", 1e-3, 1500, 0.1, 2000),
}


class TrainingError(Exception):
    pass


@dataclass
class TrainConfig:
    head: str = "lstm"
    hidden: int = 512
    loss: str = "circle"
    gamma: float = 128.0
    margin: float = 0.4
    scale: float = 10.0
    optimizer: str = "head"
    lr: float | None = None          # None: the preset's
    episodes: int | None = None      # None: the preset's
    n_way: int = 5
    k_shot: int = 1
    q_query: int = 1
    val_every: int = 250
    val_episodes: int = 300
    val_query: int = 15
    seed: int = 0

    def __post_init__(self):
        if self.head not in heads.HEADS:
            raise ValueError(f"train.head: unknown head {self.head!r} (known: {', '.join(sorted(heads.HEADS))})")
        if self.loss not in LOSSES:
            raise ValueError(f"train.loss: unknown loss {self.loss!r} (choose from {', '.join(LOSSES)})")
        if self.loss == "mse" and heads.HEADS[self.head].kind != "relation":
            raise ValueError(f"train.loss mse regresses relation scores; head {self.head!r} is an embedding head "
                             "(use circle or ce)")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer: unknown preset {self.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
        for k in ("n_way", "k_shot", "q_query", "val_every", "val_episodes", "val_query", "hidden"):
            if getattr(self, k) < 1:
                raise ValueError(f"train.{k} must be >= 1, got {getattr(self, k)}")

    def head_config(self) -> dict:
        return {"hidden": self.hidden} if self.head == "lstm" else {}

    def schedule(self):
        opt, lr, every, factor, episodes = OPTIMIZERS[self.optimizer]
        return opt, self.lr or lr, every, factor, self.episodes or episodes


def episode_scores(head, feats: SplitFeatures, episode: np.ndarray, k_shot: int, views: np.ndarray | None = None):
    """Scores (N*Q, N) of the queries of one episode (N, K+Q) against its N classes, and targets."""
    n, kq = episode.shape
    idx = episode.reshape(-1)
    vsel = np.zeros(len(idx), int) if views is None else views
    x = torch.from_numpy(feats.x[idx, vsel]).float()
    target = torch.arange(n).repeat_interleave(kq - k_shot)
    if head.kind == "embedding":
        emb = head(x).view(n, kq, -1)                            # (N, K+Q, D)
        return cosine_scores(emb[:, k_shot:].flatten(0, 1), prototypes(emb[:, :k_shot])), target  # (N*Q, N)
    maps = x.view(n, kq, *x.shape[1:])
    return head(maps[:, :k_shot].mean(1), maps[:, k_shot:].flatten(0, 1)), target


def validate(head, feats, episodes: np.ndarray, k_shot: int) -> np.ndarray:
    """Per-episode accuracy on fixed episodes (view 0), computed as at test time."""
    from .evaluate import episode_accuracies
    head.eval()
    acc = episode_accuracies(head, feats, episodes, k_shot)
    head.train()
    return acc


def train(cache, out_dir, config: TrainConfig, progress: bool = True, log=print) -> dict:
    """Train `config.head` on the train part of `cache`; keep the checkpoint with the best validation
    accuracy (never test). Resumes from `out_dir/last.pt` when it exists and matches the config."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    head = heads.build(config.head, **config.head_config())
    with FeatureStore(cache) as store:
        tr = load(store, "train", head.consumes)
        va = load(store, "val", head.consumes, views=1)
        val_eps = fixed_episodes(Path(cache), va.ids, va.by_class(), "val", config.n_way, config.k_shot,
                                 config.val_query, config.val_episodes, config.seed + 1)
        cache_info = dict(path=str(cache), settings=store.settings, settings_hash=store.settings_hash,
                          provenance=store.provenance)
    opt_name, lr, every, factor, total = config.schedule()
    params = list(head.parameters())
    meta = dict(head=config.head, head_config=config.head_config(), train_config=asdict(config), cache=cache_info)
    if not params:  # parameter-free head (mean): nothing to train, score it on validation once
        acc = validate(head, va, val_eps, config.k_shot).mean()
        for name in ("best.pt", "last.pt"):
            _save(out_dir / name, head, meta, dict(episode=0, best_val=float(acc), curve=[]))
        _write_curve(out_dir, [dict(episode=0, loss=float("nan"), val_accuracy=float(acc))])
        return dict(best_val=float(acc), episodes=0, seconds=0.0, val_seconds=0.0)
    # fused: one kernel over all parameters; the optimizer step is a fifth of a small head's episode
    optim = (torch.optim.SGD(params, lr=lr, momentum=0.9, fused=True) if opt_name == "sgd"
             else torch.optim.Adam(params, lr=lr, fused=True))
    sched = torch.optim.lr_scheduler.StepLR(optim, every, factor)
    sampler = EpisodeSampler(tr.by_class(), config.n_way, config.k_shot, config.q_query)
    rng = np.random.default_rng(config.seed)
    start, best, curve = 0, -1.0, []
    last = out_dir / "last.pt"
    if last.exists():
        ck = torch.load(last, weights_only=False)
        if ck["train_config"] != asdict(config) or ck["cache"]["settings_hash"] != cache_info["settings_hash"]:
            raise TrainingError(f"{last} was written with another config or cache; remove {out_dir} or choose "
                                "another --out")
        head.load_state_dict(ck["state_dict"])
        optim.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        rng.bit_generator.state = ck["rng"]
        torch.set_rng_state(ck["torch_rng"])
        start, best, curve = ck["episode"], ck["best_val"], ck["curve"]
        log(f"resuming from {last} at episode {start}")
    head.train()
    window, t0, val_seconds = [], time.perf_counter(), 0.0
    bar = tqdm(range(start, total), initial=start, total=total, unit="ep", disable=not progress, desc=config.head)
    for ep in bar:
        episode = sampler.sample(rng)
        views = rng.integers(tr.views, size=episode.size) if tr.views > 1 else None
        sims, target = episode_scores(head, tr, episode, config.k_shot, views)
        loss = episode_loss(config.loss, sims, target, config.gamma, config.margin, config.scale)
        if not torch.isfinite(loss):
            raise TrainingError(f"episode {ep + 1}: loss is {loss.item()} (not finite); stopped without saving "
                                f"it. Last good checkpoint: {last if last.exists() else 'none'}. Try a lower lr "
                                "or gamma.")
        optim.zero_grad()
        loss.backward()
        optim.step()
        sched.step()
        window.append(loss.item())
        if (ep + 1) % config.val_every == 0 or ep + 1 == total:
            tv = time.perf_counter()
            acc = float(validate(head, va, val_eps, config.k_shot).mean())
            curve.append(dict(episode=ep + 1, loss=float(np.mean(window)), val_accuracy=acc))
            window = []
            bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}", val=f"{acc:.3f}")
            if acc > best:
                best = acc
                _save(out_dir / "best.pt", head, meta, dict(episode=ep + 1, best_val=best))
            _save(last, head, meta, dict(episode=ep + 1, best_val=best, curve=curve, optimizer=optim.state_dict(),
                                         scheduler=sched.state_dict(), rng=rng.bit_generator.state,
                                         torch_rng=torch.get_rng_state()))
            _write_curve(out_dir, curve)
            val_seconds += time.perf_counter() - tv
    bar.close()
    seconds = time.perf_counter() - t0
    return dict(best_val=best, episodes=total, seconds=seconds, val_seconds=val_seconds,
                episodes_per_s=(total - start) / seconds if seconds > 0 else math.inf)


def _save(path: Path, head, meta: dict, extra: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(meta, state_dict=head.state_dict(), **extra), tmp)
    os.replace(tmp, path)


def _write_curve(out_dir: Path, curve: list[dict]) -> None:
    with open(out_dir / "curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["episode", "loss", "val_accuracy"])
        w.writeheader()
        w.writerows(curve)
    (out_dir / "curve.json").write_text(json.dumps(curve, indent=1))
