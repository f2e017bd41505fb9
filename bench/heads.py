"""Stage-two benchmark on a UCF101-sized synthetic cache (13,320 videos x 3 clips, ARN split sizes).

    python bench/heads.py [--episodes 18000]

Writes the pooled vectors (maps stored 768x1x1x1 to keep the file small: pooled heads never read
them) and prints: LSTM training episodes/s (5-way 1-shot, 1 query per class) and the time of the
paper's 18,000 episodes with both optimizer presets (validation every 250 timed apart), 3 training
seeds against 1 (the head preset's 2,000 episodes), how far stacking seeds into one model could go, eval time
for 600 x 10 episodes (lstm, mean), rvn eval episodes/s with the split first convolution vs the
naive per-pair computation (in memory, UCF101 test size), and peak memory (max RSS) after each step.
Then the matching heads at T = 8 clips, each at its published defaults (the study's projection 1152,
Chamfer++'s 56 triples), on a second UCF101-sized cache of 8 clips per video: training
episodes/s (5-way 1-shot; heads with parameters) and evaluation of 6,000 test episodes (15 queries),
with TRX's multiply-adds per episode and the rate reached. `--matchers-only` runs just that part.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cachegen import write_cache  # noqa: E402
from pipeline.fewshot import heads  # noqa: E402
from pipeline.fewshot.evaluate import evaluate  # noqa: E402
from pipeline.fewshot.train import TrainConfig, train  # noqa: E402

SPLIT = {"train": (70, 9154), "val": (10, 1421), "test": (21, 2745)}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=18000, help="LSTM training episodes per optimizer preset")
    ap.add_argument("--seed-episodes", type=int, default=2000, help="LSTM training episodes of the 1 vs 3 seeds figure")
    ap.add_argument("--matcher-episodes", type=int, default=300, help="training episodes timed per matcher")
    ap.add_argument("--matchers-only", action="store_true")
    ap.add_argument("--stacked-only", action="store_true", help="only the stacked-seeds estimate")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    if a.stacked_only:
        return stacked_seeds()
    if not a.matchers_only:
        paper_heads(a, tmp)
        stacked_seeds()
    matchers(a, tmp)


def ucf_sized_cache(path, clips: int):
    rng = np.random.default_rng(0)
    data, parts = {}, {}
    for part, (classes, videos) in SPLIT.items():
        per = videos // classes
        for c in range(classes):
            name = f"{part}{c:02d}"
            centre = rng.normal(size=(1, clips, 768))
            data[name] = (centre + rng.normal(size=(per, clips, 768))).astype(np.float32)
            parts[name] = part
    t = time.perf_counter()
    cache = write_cache(path, data, parts, map_shape=(768, 1, 1, 1))
    n = sum(len(v) for v in data.values())
    print(f"synthetic cache: {n} videos x {clips} clips written in {time.perf_counter() - t:.1f} s; "
          f"RSS {rss_mb():.0f} MB")
    return cache


def matchers(a, tmp):
    from pipeline.fewshot.episodes import fixed_episodes
    from pipeline.fewshot.evaluate import episode_accuracies
    from pipeline.fewshot.features import load
    from pipeline.store import FeatureStore
    cache = ucf_sized_cache(tmp / "ucf_sized_t8.h5", 8)
    with FeatureStore(cache) as st:
        test = load(st, "test", "pooled", views=1)
    eps = fixed_episodes(cache, test.ids, test.by_class(), "test", 5, 1, 15, 6000, 0)
    for name in ("diag", "max", "linear", "visil", "bimhm", "otam", "chamfer", "trx"):   # published defaults
        head = heads.build(name, {"clips": 8}, 768)
        line = f"{name} at T=8:"
        if list(head.parameters()):
            r = train(cache, tmp / f"m_{name}", TrainConfig(head=name, head_options={"clips": 8},
                                                           episodes=a.matcher_episodes, val_every=10 ** 6,
                                                           val_episodes=20), progress=False)[0]
            head = heads.build(name, {"clips": 8}, 768)
            line += f" training {a.matcher_episodes / (r['seconds'] - r['val_seconds']):.1f} episodes/s;"
        else:
            line += " no parameters (nothing to train);"
        head.eval()
        timed = eps[:600] if name == "trx" else eps       # trx: 600 episodes timed, scaled to 6000
        t = time.perf_counter()
        episode_accuracies(head, test, timed, 1)
        sec = (time.perf_counter() - t) * len(eps) / len(timed)
        line += f" eval of 6000 episodes {sec:.1f} s" + (" (600 timed, x10)" if len(timed) < len(eps) else "")
        line += f"; peak RSS {rss_mb():.0f} MB"
        if name == "trx":      # per tuple size: query keys x support keys, and query values x support values
            macs = 75 * 5 * sum(len(i) ** 2 for i in head.tuples) * 2 * head.options.dim
            line += f"; {macs / 1e9:.2f} GMAC per episode, {6000 * macs / sec / 1e9:.0f} GMAC/s"
        print(line, flush=True)


def stacked_seeds(reps: int = 300):
    """How far batching training seeds could go: one LSTM training step (5-way 1-shot, 10 videos, T=3,
    hidden 512, fused Adam) for S seeds stacked into batched matmuls (plain autograd), S = 1 and 3,
    against the library's one-seed step (written-out backward)."""
    import torch.nn.functional as F
    torch.manual_seed(0)

    def stacked(s):
        w_ih, w_hh = (torch.nn.Parameter(0.04 * torch.randn(s, 2048, d)) for d in (768, 512))
        bias = torch.nn.Parameter(torch.zeros(s, 1, 2048))
        opt = torch.optim.Adam([w_ih, w_hh, bias], fused=True)
        x = torch.randn(s, 10, 3, 768)

        def step():
            pre = (torch.baddbmm(bias, x.flatten(1, 2), w_ih.transpose(1, 2))).view(s, 10, 3, 2048)
            h = c = x.new_zeros(s, 10, 512)
            for t in range(3):
                i, f, g, o = (pre[:, :, t] + h @ w_hh.transpose(1, 2)).chunk(4, -1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            z = F.normalize(h, dim=-1)
            loss = (z[:, :5] @ z[:, 5:].transpose(1, 2)).logsumexp(-1).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    def library():
        head = heads.build("lstm", {}, 768)
        opt = torch.optim.Adam(head.parameters(), fused=True)
        x = torch.randn(10, 3, 768)

        def step():
            z = F.normalize(head.encode(x), dim=-1)
            loss = (z[:5] @ z[5:].T).logsumexp(-1).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    def ms(step):
        for _ in range(20):
            step()
        t = time.perf_counter()
        for _ in range(reps):
            step()
        return 1000 * (time.perf_counter() - t) / reps

    one, s1, s3 = ms(library()), ms(stacked(1)), ms(stacked(3))
    print(f"seeds stacked into one model (training step only): library one seed {one:.2f} ms; stacked autograd "
          f"S=1 {s1:.2f} ms, S=3 {s3:.2f} ms = {s3 / s1:.2f}x S=1 and {s3 / one:.2f}x the library's one seed")


def paper_heads(a, tmp):
    rng = np.random.default_rng(0)
    cache = ucf_sized_cache(tmp / "ucf_sized.h5", 3)
    for preset in ("head", "paper"):
        cfg = TrainConfig(head="lstm", optimizer=preset, episodes=a.episodes)
        r = train(cache, tmp / f"lstm_{preset}", cfg, progress=False)[0]
        steps = r["seconds"] - r["val_seconds"]
        print(f"lstm train, preset {preset} (5-way 1-shot, 1 query/class): {a.episodes / steps:.0f} episodes/s, "
              f"{a.episodes} episodes in {steps:.1f} s = {steps / 60:.2f} min; {r['val_seconds']:.1f} s more for "
              f"{a.episodes // cfg.val_every} validations (300 episodes) and checkpoints; peak RSS {rss_mb():.0f} MB")
    seconds = {}
    for seeds in (1, 3):     # training seeds run one after another in one process
        t = time.perf_counter()
        train(cache, tmp / f"seeds{seeds}", TrainConfig(head="lstm", episodes=a.seed_episodes, seeds=seeds),
              progress=False)
        seconds[seeds] = time.perf_counter() - t
    print(f"lstm train, preset head, {a.seed_episodes} episodes: 1 seed {seconds[1]:.1f} s, 3 seeds {seconds[3]:.1f} s "
          f"= {seconds[3] / seconds[1]:.2f}x one seed (validation included)")
    train(cache, tmp / "mean", TrainConfig(head="mean"), progress=False)
    for name, run in (("lstm", "lstm_head"), ("mean", "mean")):
        evaluate([tmp / run], cache, episodes=600, runs=10)   # first call writes the episode file
        t = time.perf_counter()
        evaluate([tmp / run], cache, episodes=600, runs=10)
        print(f"{name} eval, 6000 episodes (5-way 1-shot, 15 queries), best.pt and last.pt: "
              f"{time.perf_counter() - t:.2f} s; peak RSS {rss_mb():.0f} MB")
    head = heads.build("rvn1", {}, 768).eval()
    maps = torch.randn(2745, 768, 8, 4, 4, dtype=torch.float16)   # UCF101 test split, clip-mean maps
    eps = np.stack([rng.choice(2745, 80, replace=False).reshape(5, 16) for _ in range(20)])
    with torch.no_grad():
        t = time.perf_counter()
        for ep in eps:
            x = maps[torch.from_numpy(ep.ravel())].float().view(5, 16, 768, 8, 4, 4)
            head.naive(x[:, :1].mean(1), x[:, 1:].flatten(0, 1))
        naive = len(eps) / (time.perf_counter() - t)
        from pipeline.fewshot.evaluate import episode_accuracies
        from pipeline.fewshot.features import SplitFeatures
        feats = SplitFeatures(np.arange(2745).astype(str), np.zeros(2745).astype(str), maps[:, None].numpy(), 1)
        t = time.perf_counter()
        episode_accuracies(head, feats, np.concatenate([eps] * 5), 1)
        split = 5 * len(eps) / (time.perf_counter() - t)
    print(f"rvn1 eval: {split:.1f} episodes/s with per-video halves of conv1 (incl. projecting 2745 videos once) "
          f"vs {naive:.2f} episodes/s naive per pair: {split / naive:.1f}x; 6000 episodes ~ {6000 / split / 60:.1f} min; "
          f"peak RSS {rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
