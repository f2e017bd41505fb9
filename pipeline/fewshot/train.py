"""Stage two: episodic training of a head over the cached features."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from ..device import pick_device
from ..errors import ConfigError, PipelineError
from ..files import atomic_write_text, check_output, exclusive
from ..store import FeatureStore
from . import checkpoint, heads
from .checkpoint import Checkpoint
from .episodes import EpisodeError, EpisodeSampler, fixed_episodes
from .features import SAMPLERS, SplitFeatures, load
from .losses import LOSSES, PER_VIDEO, check_loss, episode_loss

# name -> (optimizer, lr, lr decay every, decay factor, episodes, gradient norm clip (0: none))
OPTIMIZERS = {
    # The paper's values (SGD, lr 1e-5, x0.1 every 12,000 episodes, 18,000 episodes); they were set
    # for fine-tuning the whole network end to end and barely move a freshly initialised head.
    "paper": ("sgd", 1e-5, 12000, 0.1, 18000, 0),
    # Head-only training on cached features (chosen on the demo cache, see docs/training-evaluation.md).
    "head": ("adam", 1e-3, 1500, 0.1, 2000, 0),
    # The matching study's run_matching.py as its README runs it: plain SGD (its default --opt), lr 1e-3
    # (tuned per head with optuna in scripts outside the repository), no decay (milestone 1,000,000),
    # one task per step, gradient norm clipped at 1000, 20,002 iterations (150,002 for SSv2: set episodes).
    "study": ("plain_sgd", 1e-3, 1_000_000, 0.1, 20002, 1000),
}


class TrainingError(PipelineError):
    pass


@dataclass
class TrainConfig:
    head: str = "lstm"
    head_options: dict = field(default_factory=dict)
    head_file: str | None = None     # a user's file of heads (`--head-file`)
    loss: str | None = None          # None: the head's own (its paper's)
    gamma: float = 128.0
    margin: float = 0.4
    scale: float | None = None       # ce: multiplier of the scores; None: 10 on cosines, 1 on logits
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
    seeds: int = 1                   # training seeds seed, seed + 1, ...: one checkpoint folder each
    train_views: str = "all"         # cached crops drawn in training: all | random (views >= 1: the paper's)
    sampler: str = "segments"        # how training draws a video's clips: segments (ours) | study (the matching study's)
    seed_list: list | None = None    # explicit training seeds (the matching study's 1, 5, 10) instead of seed, seed + 1, ...
    features_dtype: str = "float32"  # pooled clip vectors in memory: float16 halves it (a large imported cache)

    def __post_init__(self):
        if self.head_file:
            heads.load_head_file(self.head_file)
        # the options in full (defaults included, typed), so that equal configs compare equal
        self.head_options = asdict(heads.parse_options(heads.get(self.head), self.head_options))
        kind, own = heads.get(self.head).scoring(heads.parse_options(heads.get(self.head), self.head_options))
        if self.loss is None:
            self.loss = own
        if self.loss not in LOSSES:
            raise ConfigError(f"train.loss: unknown loss {self.loss!r} (choose from {', '.join(LOSSES)})")
        check_loss(self.loss, self.head, kind, own)
        if self.scale is None:
            self.scale = 10.0 if kind == "cosine" else 1.0
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer: unknown preset {self.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
        for k in ("k_shot", "q_query", "val_every", "val_episodes", "val_query", "seeds"):
            if getattr(self, k) < 1:
                raise ConfigError(f"train.{k} must be >= 1, got {getattr(self, k)}")
        if self.features_dtype not in ("float32", "float16"):
            raise ConfigError(f"train.features_dtype must be float32 or float16, got {self.features_dtype!r}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"train.sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.seed_list is not None and (not self.seed_list or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in self.seed_list)
                or len(set(self.seed_list)) < len(self.seed_list)):
            raise ConfigError(f"train.seed_list must be distinct integers >= 0, got {self.seed_list!r}")
        if self.train_views not in ("all", "random"):
            raise ConfigError(f"train.train_views must be all or random, got {self.train_views!r}")
        if self.n_way < 2:
            raise ConfigError(f"train.n_way must be >= 2, got {self.n_way}")
        if self.episodes is not None and self.episodes < 1:
            raise ConfigError(f"train.episodes must be >= 1, got {self.episodes}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"train.lr must be a finite number > 0, got {self.lr}")
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ConfigError(f"train.gamma must be a finite number > 0, got {self.gamma}")
        # circle loss's decision margins are Delta_n = m and Delta_p = 1 - m: both inside the cosine range
        # needs -1 < m < 1 (the paper's Fig. 7 runs m = -0.2 ... 0.4)
        if not -1 < self.margin < 1:
            raise ConfigError(f"train.margin must be in (-1, 1), got {self.margin}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ConfigError(f"train.scale must be a finite number > 0, got {self.scale}")

    @classmethod
    def from_mapping(cls, d: dict, where: str) -> "TrainConfig":
        """A run from params.yaml (`where` names it, e.g. runs.lstm_circle): unknown keys and values
        of the wrong type are errors that name the key."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping of training settings, got {d!r}")
        types = {f.name: f.type for f in fields(cls)}
        for k, v in d.items():
            if k not in types:
                raise ConfigError(f"{where}.{k}: unknown setting (known: {', '.join(types)})")
            want = types[k].split(" | ")[0]
            ok = dict(int=lambda x: isinstance(x, int) and not isinstance(x, bool),
                      float=lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
                      str=lambda x: isinstance(x, str), dict=lambda x: isinstance(x, dict),
                      list=lambda x: isinstance(x, list))[want]
            if not (ok(v) or (v is None and "None" in types[k])):
                raise ConfigError(f"{where}.{k}: expected {types[k]}, got {v!r}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def schedule(self):
        opt, lr, every, factor, episodes, clip = OPTIMIZERS[self.optimizer]
        return (opt, lr if self.lr is None else self.lr, every, factor,
                episodes if self.episodes is None else self.episodes, clip)

    def training_seeds(self) -> list[int]:
        return list(self.seed_list) if self.seed_list is not None else list(range(self.seed, self.seed + self.seeds))


def episode_scores(head, feats: SplitFeatures, episode: np.ndarray, k_shot: int, views: np.ndarray | None = None,
                   rng: np.random.Generator | None = None, per_video: bool = False, device="cpu",
                   sampler: str = "segments"):
    """Scores (N*Q, N) of the queries of one episode (N, K+Q) against its N classes, and targets; with
    `rng`, each video's clips are drawn at random within their segments; with `per_video`, scores
    (N*Q, N, K) against each support video, scored as a one-shot class of its own."""
    n, kq = episode.shape
    x = feats.inputs(episode.reshape(-1), views, head.clips, rng, sampler)
    z = head.encode(torch.from_numpy(x).to(device).float()).unflatten(0, (n, kq))        # (N, K+Q, ...)
    target = torch.arange(n, device=device).repeat_interleave(kq - k_shot)
    support, queries = z[:, :k_shot], head.as_query(z[:, k_shot:].flatten(0, 1))
    if per_video:
        return head.scores(support.flatten(0, 1)[:, None], queries).unflatten(1, (n, k_shot)), target
    return head.scores(support, queries), target


def validate(head, feats, episodes: np.ndarray, k_shot: int, device="cpu") -> np.ndarray:
    """Per-episode accuracy on fixed episodes (view 0), computed as at test time."""
    from .evaluate import episode_accuracies
    head.eval()
    acc = episode_accuracies(head, feats, episodes, k_shot, device=device)
    head.train()
    return acc


def train(cache, out_dir, config: TrainConfig, progress: bool = True, log=print, device: str = "cpu",
          drop_nonfinite: bool = False, overwrite: bool = False) -> list[dict]:
    """Train `config.head` on the train part of `cache`, once per training seed (config.seed,
    config.seed + 1, ...: `out_dir/seed-N/`), each keeping the checkpoint with the best validation
    accuracy (never test), all on the same fixed validation episodes. A seed resumes from its
    last.pt when that exists and matches the config. `device` (cpu, cuda, auto) is where the head
    runs; it is not part of the config: a run resumes on another device. With `drop_nonfinite`, videos
    whose features hold a NaN or infinity are left out (named, and recorded in the checkpoint) instead
    of stopping the run. A seed folder holding a run of another config or cache is refused, whatever
    the head, unless `overwrite`, which removes it first."""
    dev = pick_device(device)
    with FeatureStore(cache) as store:   # a missing or unreadable cache fails before anything is created
        if config.train_views == "random" and store.videos["n_views"].max(initial=0) < 2:
            raise ConfigError(f"train_views random: {cache} holds the centre crop only; extract with --views 2 "
                              "or more")
        settings_hash = store.settings_hash
    out_dir = Path(out_dir)
    check_output(out_dir, "run folder", folder=True)
    with exclusive(out_dir, "run folder"):
        for seed in config.training_seeds():
            other = other_run(out_dir / f"seed-{seed}", replace(config, seed=seed, seeds=1, seed_list=None),
                              settings_hash)
            if other and not overwrite:
                raise TrainingError(f"{out_dir / f'seed-{seed}'} holds another run ({other}); pass --overwrite to "
                                    "replace it, or choose another --out")
            if other:
                for name in ("best.pt", "last.pt", "curve.csv", "curve.json"):
                    (out_dir / f"seed-{seed}" / name).unlink(missing_ok=True)
        results = []
        for seed in config.training_seeds():
            one = replace(config, seed=seed, seeds=1, seed_list=None)
            results.append(dict(_train(cache, out_dir / f"seed-{seed}", one, config.training_seeds()[0] + 1, progress, log, dev,
                                       drop_nonfinite), seed=seed, folder=str(out_dir / f"seed-{seed}")))
        return results


def other_run(folder: Path, config: TrainConfig, settings_hash: str) -> str | None:
    """What differs between the run saved in `folder` (its last.pt, else its best.pt) and `config` on a
    cache of `settings_hash`, in words; None when the folder holds no run or this very one."""
    saved = next((folder / n for n in ("last.pt", "best.pt") if (folder / n).exists()), None)
    if saved is None:
        return None
    ck = checkpoint.load(saved)
    if ck.head != config.head:
        return f"head {ck.head}, not {config.head}"
    if ck.head_options != config.head_options:
        return f"head {ck.head} with options {heads.format_options(ck.head_options)}"
    if ck.cache["settings_hash"] != settings_hash:
        return f"trained on a cache of other settings ({ck.cache['path']})"
    changed = sorted(k for k in set(ck.train_config) | set(asdict(config))
                     if ck.train_config.get(k) != asdict(config).get(k))
    return f"training settings differ: {', '.join(changed)}" if changed else None


def _train(cache, out_dir: Path, config: TrainConfig, val_seed: int, progress: bool, log, device,
           drop_nonfinite: bool) -> dict:
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    head_file = heads.load_head_file(config.head_file) if config.head_file else None
    cls = heads.get(config.head)
    view = heads.view_of(cls, heads.parse_options(cls, config.head_options))
    with FeatureStore(cache) as store:
        tr = load(store, "train", view, drop_nonfinite=drop_nonfinite, pooled_dtype=config.features_dtype)
        va = load(store, "val", view, views=1, drop_nonfinite=drop_nonfinite, pooled_dtype=config.features_dtype)
        head = heads.build(config.head, config.head_options, tr.feature_size).to(device)
        dropped = {p: list(f.dropped) for p, f in (("train", tr), ("val", va)) if f.dropped}
        for p, ids in dropped.items():
            log(f"left out of {p} for non-finite features (--drop-nonfinite): {len(ids)} video(s): "
                f"{', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''}")
        with torch.no_grad():        # options the data cannot serve (a sequence too short or too long) fail here
            head.encode(torch.from_numpy(np.asarray(tr.inputs([0], clips=head.clips), np.float32)).to(device))
        try:
            val_eps = fixed_episodes(Path(cache), va.ids, va.by_class(), "val", config.n_way, config.k_shot,
                                     config.val_query, config.val_episodes, val_seed)
        except EpisodeError as e:
            raise EpisodeError(f"validation episodes of {cache}: {e} (fewer queries: --val-query)") from None
        if any(p.requires_grad for p in head.parameters()):
            try:
                sampler = EpisodeSampler(tr.by_class(), config.n_way, config.k_shot, config.q_query)
            except EpisodeError as e:
                raise EpisodeError(f"training episodes of {cache}: {e} (fewer queries: --q-query)") from None
        out_dir.mkdir(parents=True, exist_ok=True)        # nothing is written for a run refused above
        cache_info = dict(path=str(cache), settings=store.settings, settings_hash=store.settings_hash,
                          provenance=store.provenance, dropped=dropped, feature_size=tr.feature_size)
    opt_name, lr, every, factor, total, clip = config.schedule()
    params = [p for p in head.parameters() if p.requires_grad]

    def save(name, episode, best_val, resume=None):
        checkpoint.save(out_dir / name, Checkpoint(config.head, config.head_options, asdict(config), cache_info,
                                                   head.state_dict(), episode, best_val, head_file, resume))

    if not params:  # parameter-free head (mean): nothing to train, score it on validation once
        acc = float(validate(head, va, val_eps, config.k_shot, device).mean())
        save("best.pt", 0, acc)
        save("last.pt", 0, acc, dict(curve=[]))
        _write_curve(out_dir, [dict(episode=0, loss=float("nan"), val_accuracy=acc)])
        return dict(best_val=acc, best_episode=0, episodes=0, seconds=0.0, val_seconds=0.0)
    # fused: one kernel over all parameters; the optimizer step is a fifth of a small head's episode
    optim = (torch.optim.Adam(params, lr=lr, fused=True) if opt_name == "adam"
             else torch.optim.SGD(params, lr=lr, momentum=0.9 if opt_name == "sgd" else 0.0, fused=True))
    sched = torch.optim.lr_scheduler.StepLR(optim, every, factor)
    first_view = 1 if config.train_views == "random" else 0     # view 0 is the centre crop
    rng = np.random.default_rng(config.seed)
    start, best, curve = 0, -1.0, []
    last = out_dir / "last.pt"
    if last.exists():
        ck = checkpoint.load(last)
        if ck.train_config != asdict(config) or ck.cache["settings_hash"] != cache_info["settings_hash"] \
                or ck.cache.get("dropped", {}) != dropped or ck.resume is None:
            raise TrainingError(f"{last} was written with another config or cache; remove {out_dir} or choose "
                                "another --out")
        head.load_state_dict(ck.state_dict)
        optim.load_state_dict(ck.resume["optimizer"])
        sched.load_state_dict(ck.resume["scheduler"])
        rng.bit_generator.state = ck.resume["rng"]
        torch.set_rng_state(ck.resume["torch_rng"])
        start, best, curve = ck.episode, ck.best_val, ck.resume["curve"]
        log(f"resuming from {last} at episode {start}")
    head.train()
    window, t0, val_seconds = [], time.perf_counter(), 0.0
    bar = tqdm(range(start, total), initial=start, total=total, unit="ep", disable=not progress,
               desc=f"{config.head} seed {config.seed}")
    for ep in bar:
        episode = sampler.sample(rng)
        views = rng.integers(first_view, tr.views, size=episode.size) if tr.views > 1 else None
        sims, target = episode_scores(head, tr, episode, config.k_shot, views, rng, config.loss in PER_VIDEO, device,
                                      config.sampler)
        loss = episode_loss(config.loss, sims, target, config.gamma, config.margin, config.scale)
        if not torch.isfinite(loss):
            raise TrainingError(f"episode {ep + 1}: loss is {loss.item()} (not finite); stopped without saving "
                                f"it. Last good checkpoint: {last if last.exists() else 'none'}. Try a lower lr "
                                "or gamma.")
        optim.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optim.step()
        sched.step()
        window.append(loss.item())
        if (ep + 1) % config.val_every == 0 or ep + 1 == total:
            tv = time.perf_counter()
            acc = float(validate(head, va, val_eps, config.k_shot, device).mean())
            curve.append(dict(episode=ep + 1, loss=float(np.mean(window)), val_accuracy=acc))
            window = []
            bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}", val=f"{acc:.3f}")
            if acc > best:
                best = acc
                save("best.pt", ep + 1, best)
            save("last.pt", ep + 1, best, dict(curve=curve, optimizer=optim.state_dict(),
                                               scheduler=sched.state_dict(), rng=rng.bit_generator.state,
                                               torch_rng=torch.get_rng_state()))
            _write_curve(out_dir, curve)
            val_seconds += time.perf_counter() - tv
    bar.close()
    seconds = time.perf_counter() - t0
    best_at = next((c["episode"] for c in curve if c["val_accuracy"] == best), total)   # the first to reach it
    return dict(best_val=best, best_episode=best_at, episodes=total, seconds=seconds, val_seconds=val_seconds,
                episodes_per_s=(total - start) / seconds if seconds > 0 else math.inf)


def _write_curve(out_dir: Path, curve: list[dict]) -> None:
    rows = ["episode,loss,val_accuracy"] + [f"{r['episode']},{r['loss']},{r['val_accuracy']}" for r in curve]
    atomic_write_text(out_dir / "curve.csv", "\n".join(rows) + "\n")
    atomic_write_text(out_dir / "curve.json", json.dumps(curve, indent=1))
