"""GPU benchmark: every CUDA code path of the toolkit on one device, one printed line per figure.

    python bench/gpu.py [--device cuda|cpu] [--small] [--demo PATH] [--videos N] [--out-json PATH]

On one H100 with 16 cores the default run takes about 3-5 minutes; `--device cpu --small` (tiny
clips, a few demo videos, a few episodes) takes well under a minute and is what the tests run.

Figures, each on a line `name: value unit -- note` (or `FAILED name: error` when a library path
breaks on the device; the run goes on, and exits 1 at the end):

 1. MFNet forward only (a ready batch on the device, no decoding or copies): clips/s at batch
    8/32/64 in fp32, bf16 and fp16 autocast, channels_last_3d on and off, plus the largest batch
    with cudnn.benchmark (CPU: batch 2, fp32/bf16, channels-last), and the fraction of the rate
    of a dense Conv3d 256->256 3x3x3 on (B, 256, 8, 28, 28) in the same precision that it reaches.
 2. End-to-end `extract_features` over the demo (generated in a temp dir unless --demo; --videos
    N for a subset): clips/s and ratio to forward only at the same batch, at the CLI's default
    decoding processes, then with 2/4/8/16 processes (clips/s, and clips/s per process) to show where
    decoding stops being the bound.
 3. Cosine agreement of pooled features (spatio-temporal mean of the maps) of real demo clips:
    bf16/fp16 vs fp32 on the device, device vs CPU fp32, and the library's BatchForward vs the
    bench's own forward (normalised on the CPU) on the device; and BatchForward's batches in flight
    (`submit`/`wait`, what `extract` runs) against one batch at a time.
 4. `predict` on the device: a `mean` checkpoint (no training needed) over a small cache of demo
    videos extracted on the CPU, a support folder and a few queries from other demo videos.
 5. LSTM (hidden 512) training and LSTM/mean eval episodes/s on the device vs the CPU on a
    UCF101-sized synthetic pooled cache held in memory (13,250 videos x 3 clips x 768), with the
    loop written here as `train.episode_scores` and `evaluate.episode_accuracies` do it; the
    library's own `episode_loss` and `episode_accuracies` are checked against it.
 6. The peak GPU memory of every step (torch.cuda.max_memory_allocated, reset between steps).
 7. The library's own `train` and `evaluate` with `device=` (what `pipeline train/eval --device`
    run) for `lstm` and the matching head `otam`, over the same synthetic data written as a cache
    file: training episodes/s, evaluation episodes/s, and the share of episodes whose accuracy is
    the same on the device as on the CPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.device import pick_device  # noqa: E402
from pipeline.extraction.backbone import AUTOCAST, Backbone, BatchForward  # noqa: E402
from pipeline.extraction.datasets import load_split, resolve  # noqa: E402
from pipeline.extraction.extractor import extract_features  # noqa: E402
from pipeline.extraction.settings import ExtractSettings  # noqa: E402
from pipeline.extraction.video import Preprocess, Sampling, normalize_batch, read_clips  # noqa: E402
from pipeline.fewshot import heads  # noqa: E402
from pipeline.fewshot.episodes import EpisodeSampler  # noqa: E402
from pipeline.fewshot.evaluate import episode_accuracies  # noqa: E402
from pipeline.fewshot.features import SplitFeatures  # noqa: E402
from pipeline.fewshot.losses import circle_loss, episode_loss  # noqa: E402
from pipeline.fewshot.train import TrainConfig, train  # noqa: E402
from pipeline.store import pool_maps  # noqa: E402
from pipeline.tools import demo_data  # noqa: E402
from pipeline.tools.predict import predict  # noqa: E402

warnings.filterwarnings("ignore")   # the random-init MFNet warning, once per backbone

CPUS = os.cpu_count() or 1
CL3D = torch.channels_last_3d
# ARN's UCF101 split, (classes, videos per class): 9,100 + 1,420 + 2,730 = 13,250 videos
UCF101_SIZED = {"train": (70, 130), "val": (10, 142), "test": (21, 130)}


def plan(dev: torch.device, small: bool) -> SimpleNamespace:
    """Sizes of every figure: the full run on CUDA, a CPU run, or tiny ones (--small) for tests."""
    cuda, big = dev.type == "cuda", dev.type == "cuda" and not small
    return SimpleNamespace(
        sampling=Sampling(clips=2, frames=4) if small else Sampling(),
        preprocess=Preprocess(resize=40, crop=32) if small else Preprocess(),
        batches=(8, 32, 64) if big else (2,),
        precisions=("fp32", "bf16", "fp16") if cuda else ("fp32", "bf16"),
        # CPU: only the CLI's default layout; contiguous bf16 takes a slow path there (5x slower)
        formats=(False, True) if cuda else (True,),
        warm=5 if big else 1,
        reps=10 if big else 2 if small else 3,
        conv_input=(8, 256, 8, 28, 28) if big else (1, 256, 4, 7, 7) if small else (1, 256, 8, 28, 28),
        e2e_batch=32 if big else 2,
        e2e_precisions=("fp32", "bf16") if cuda else ("fp32",),
        threads=tuple(t for t in ((2, 4, 8, 16) if big else (1, 2)) if t <= CPUS) or (1,),
        videos_per_class=2 if small else 20,
        seconds=(0.6, 1.0) if small else (2.0, 6.0),
        videos=6 if small else 0,
        feature_videos=2 if small else 8,
        split={"train": (5, 4), "val": (2, 2), "test": (5, 16)} if small else UCF101_SIZED,
        train_warm=2 if small else 20,
        train_episodes={"cuda": 10, "cpu": 10} if small else {"cuda": 500, "cpu": 200},
        eval_episodes=20 if small else 6000,
    )


def settings(p, precision: str) -> ExtractSettings:
    return ExtractSettings(sampling=p.sampling, preprocess=p.preprocess, precision=precision)


class Report:
    """Prints and collects the figures; a failing figure is printed and recorded, never fatal."""

    def __init__(self, dev: torch.device):
        self.dev, self.figures, self.failed = dev, {}, []

    def line(self, name: str, value, unit: str = "", note: str = "", **extra):
        self.figures[name] = dict(value=value, unit=unit, note=note, **extra)
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        print(f"{name}: {shown}" + (f" {unit}" if unit else "") + (f" -- {note}" if note else ""), flush=True)

    @contextmanager
    def figure(self, name: str):
        try:
            yield
        except Exception as e:  # noqa: BLE001 - one broken path must not hide the other results
            tb = traceback.extract_tb(e.__traceback__)
            # the innermost frame in the toolkit (else in this script) says where it broke, not where torch noticed
            ours = [f for f in tb if "/pipeline/" in f.filename] or [f for f in tb if f.filename == __file__] or tb
            at = ""
            if ours:
                f = ours[-1]
                path = Path(f.filename)
                at = f" (at {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{f.lineno})"
            msg = (str(e).strip().splitlines() or [""])[0][:300]
            self.failed.append(dict(figure=name, error=f"{type(e).__name__}: {msg}", where=at.strip(" ()")))
            print(f"FAILED {name}: {type(e).__name__}: {msg}{at}", flush=True)

    @contextmanager
    def step(self, name: str):
        """A group of figures; on CUDA its peak GPU memory is printed after it."""
        cuda = self.dev.type == "cuda"
        # guarded too: an asynchronous CUDA error of the last step surfaces at the next synchronize
        if cuda:
            with self.figure(f"GPU memory reset before {name}"):
                torch.cuda.synchronize(self.dev)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.dev)
        t = time.perf_counter()
        with self.figure(name):
            yield
        print(f"# step {name}: {time.perf_counter() - t:.1f} s", flush=True)
        if cuda:
            with self.figure(f"peak GPU memory, {name}"):
                torch.cuda.synchronize(self.dev)
                self.line(f"peak GPU memory, {name}", torch.cuda.max_memory_allocated(self.dev) / 2**20, "MB")


def sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def rate(fn, items, warm: int, reps: int, dev: torch.device) -> float:
    """items per second of `fn`, after `warm` untimed calls; waits for the device at both ends."""
    for _ in range(warm):
        fn()
    sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(dev)
    return items * reps / (time.perf_counter() - t)


def autocast(dev: torch.device, precision: str):
    amp = AUTOCAST[precision]
    return torch.autocast(dev.type, dtype=amp, enabled=amp is not None)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ---------------------------------------------------------------- 1. forward only

def macs_per_clip(model, shape, dev) -> int:
    """Multiply-adds of the convolutions for one clip of `shape` (3, F, H, W), counted by hooks."""
    total = 0

    def count(m, inp, out):
        nonlocal total
        total += out.numel() * (m.in_channels // m.groups) * int(np.prod(m.kernel_size))
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    with torch.inference_mode():
        model.forward_features(torch.zeros(1, *shape, device=dev))
    for h in hooks:
        h.remove()
    return total


def conv_gflops(dev, precision: str, shape, p) -> float:
    """GFLOP/s of a dense Conv3d 256->256 3x3x3: the device's attainable conv rate, best layout."""
    conv = torch.nn.Conv3d(256, 256, 3, padding=1, bias=False).to(dev).eval()
    x = torch.randn(shape, device=dev)
    flop = 2 * shape[0] * 256 * int(np.prod(shape[2:])) * 256 * 27
    best = 0.0
    for fmt in (torch.contiguous_format, CL3D):
        c, xi = conv.to(memory_format=fmt), x.contiguous(memory_format=fmt)

        def f():
            with torch.inference_mode(), autocast(dev, precision):
                c(xi)
        best = max(best, rate(f, flop / 1e9, p.warm, p.reps, dev))
    return best


def forward_rate(model, dev, batch: int, shape, precision: str, channels_last: bool, p) -> float:
    fmt = CL3D if channels_last else torch.contiguous_format
    m = model.to(memory_format=fmt)
    x = torch.randn(batch, *shape, device=dev).contiguous(memory_format=fmt)

    def f():
        with torch.inference_mode(), autocast(dev, precision):
            m.forward_features(x)
    return rate(f, batch, p.warm, p.reps, dev)


def forward_figures(r: Report, p, dev) -> dict:
    """Figure 1; returns {(precision, batch, channels_last): clips/s} for the end-to-end ratios."""
    model = Backbone.load(None, 0).model.to(dev)
    shape = (3, p.sampling.frames, p.preprocess.crop, p.preprocess.crop)
    macs = macs_per_clip(model, shape, dev)
    r.line(f"MFNet per clip ({shape[1]}x{shape[2]}x{shape[3]})", macs / 1e9, "GMAC", f"{2 * macs / 1e9:.3g} GFLOP")
    dense = {}
    for prec in p.precisions:
        name = f"dense conv3d 256->256 3x3x3 {prec}"
        with r.figure(name):
            dense[prec] = conv_gflops(dev, prec, p.conv_input, p)
            r.line(name, dense[prec], "GFLOP/s", f"input {p.conv_input}, best of both memory formats")
    found = {}

    def one(prec, batch, cl, label):
        name = f"forward {prec} batch {batch} {label}"
        with r.figure(name):
            cps = forward_rate(model, dev, batch, shape, prec, cl, p)
            gflops = 2 * macs * cps / 1e9
            frac = gflops / dense[prec] if dense.get(prec) else float("nan")
            r.line(name, cps, "clips/s", f"{gflops:.4g} GFLOP/s = {frac:.1%} of dense conv3d {prec}",
                   gflops=gflops, dense_fraction=frac)
            return cps

    for prec in p.precisions:
        for batch in p.batches:
            for cl in p.formats:
                found[(prec, batch, cl)] = one(prec, batch, cl, "channels_last" if cl else "contiguous")
    if dev.type == "cuda":
        # the library leaves cudnn.benchmark off; this shows what autotuning would add
        torch.backends.cudnn.benchmark = True
        try:
            for prec in p.precisions:
                one(prec, max(p.batches), True, "channels_last cudnn.benchmark")
        finally:
            torch.backends.cudnn.benchmark = False
    return found


# ---------------------------------------------------------------- 2. end to end

def demo_dataset(r: Report, a, p, tmp: Path):
    if a.demo:
        root = Path(a.demo)
    else:
        root = tmp / "demo"
        t = time.perf_counter()
        demo_data.generate(root, 0, p.videos_per_class, p.seconds, jobs=CPUS, progress=False)
        print(f"# demo dataset: {p.videos_per_class} videos per class generated in {time.perf_counter() - t:.1f} s",
              flush=True)
    entries, _ = resolve(load_split(root / "splits"), root)
    r.line("demo videos", len(entries), "videos", str(root))
    return entries


def spread(entries, n: int):
    """n entries spread over the list (so over classes), or all of them for n = 0."""
    return entries[:: max(1, len(entries) // n)][:n] if n else entries


def extract_figures(r: Report, a, p, dev, entries, forward: dict, tmp: Path):
    subset = spread(entries, a.videos if a.videos else p.videos)
    default_workers = min(8, CPUS)   # the CLI's --workers default
    b = p.e2e_batch
    done = {}

    def run(prec: str, workers: int) -> dict:
        if (prec, workers) not in done:
            out = tmp / f"e2e-{prec}-{workers}.h5"
            done[(prec, workers)] = extract_features(subset, out, settings(p, prec), Backbone.load(None, 0),
                                                     batch_size=b, workers=workers, device=dev.type,
                                                     channels_last=True, progress=False)
            out.unlink()
        return done[(prec, workers)]

    for prec in p.e2e_precisions:
        name = f"extract {prec} batch {b} workers {default_workers}"
        with r.figure(name):
            s = run(prec, default_workers)
            fwd = forward.get((prec, b, True))
            r.line(name, s["clips_per_s"], "clips/s", f"{len(subset)} videos, {s['computed_clips']} clips in "
                   f"{s['seconds']:.1f} s on {dev.type}")
            if fwd:
                r.line(f"{name} vs forward only", s["clips_per_s"] / fwd, "x", f"forward only {fwd:.1f} clips/s")
    prec = p.e2e_precisions[-1]
    best = {}
    for w in sorted(set(p.threads) | {default_workers}):
        name = f"extract {prec} batch {b} workers {w}"
        with r.figure(name):
            s = run(prec, w)
            best[w] = s["clips_per_s"]
            if w != default_workers:
                r.line(name, best[w], "clips/s")
            r.line(f"{name} per decoding process", best[w] / w, "clips/s/process")
    if best:
        top = max(best.values())
        knee = min(w for w, v in best.items() if v >= 0.9 * top)
        r.line(f"extract {prec} batch {b} fewest workers within 90% of best", knee, "processes",
               f"best {top:.1f} clips/s at workers {max(best, key=best.get)}")


# ---------------------------------------------------------------- 3. features

def bench_pooled(model, dev, precision: str, clips: np.ndarray, batch: int = 8) -> np.ndarray:
    """Pooled features as BatchForward computes them, except that the clips are normalised on the CPU."""
    out = []
    for i in range(0, len(clips), batch):
        x = normalize_batch(torch.from_numpy(clips[i:i + batch])).to(dev).contiguous(memory_format=CL3D)
        with torch.inference_mode(), autocast(dev, precision):
            y = model.forward_features(x)
        out.append(pool_maps(y.float().cpu().numpy()))
    return np.concatenate(out)


def feature_figures(r: Report, p, dev, entries):
    s = settings(p, "fp32")
    chosen = spread(entries, p.feature_videos)
    clips = np.concatenate([read_clips(e.path, s.sampling, s.preprocess, raw=True).clips[0] for e in chosen])
    n = f"{len(clips)} clips of {len(chosen)} demo videos"
    d = dev.type
    model = Backbone.load(None, 0).model.to(dev).to(memory_format=CL3D)
    pooled = {}
    for prec in p.precisions:
        with r.figure(f"features {d} {prec}"):
            pooled[prec] = bench_pooled(model, dev, prec, clips)
    if d != "cpu":
        with r.figure("features cpu fp32"):
            cpu = bench_pooled(Backbone.load(None, 0).model.to(memory_format=CL3D), torch.device("cpu"), "fp32", clips)

    def compare(name, a, b):
        with r.figure(name):
            c = cosines(a(), b())
            r.line(name, float(c.min()), "", f"mean {c.mean():.6f}, {n}")

    for prec in p.precisions[1:]:
        compare(f"pooled cosine min, {d} {prec} vs {d} fp32", lambda: pooled[prec], lambda: pooled["fp32"])
    if d != "cpu":
        compare(f"pooled cosine min, {d} fp32 vs cpu fp32", lambda: pooled["fp32"], lambda: cpu)
        compare(f"pooled cosine min, {d} bf16 vs cpu fp32", lambda: pooled["bf16"], lambda: cpu)
    # the library's device path (uint8 shipped to the device, normalised there) must give the same numbers
    for prec in ("fp32", "bf16"):
        compare(f"pooled cosine min, BatchForward {d} {prec} vs bench forward {d} {prec}",
                lambda: pool_maps(BatchForward(Backbone.load(None, 0).model, dev, settings(p, prec), True)(clips)),
                lambda: pooled[prec])
    # what `extract` runs: batches submitted while earlier ones are in flight (on CUDA pinned buffers,
    # the copies on a stream of their own), against each batch computed at once
    name = f"max abs difference, BatchForward {d} fp32 batches in flight vs one at a time"
    with r.figure(name):
        f = BatchForward(Backbone.load(None, 0).model, dev, settings(p, "fp32"), True)
        starts = range(0, len(clips), 8)
        once = np.concatenate([f(clips[i:i + 8]) for i in starts])
        staged = np.full_like(once, np.nan)
        for i in starts:
            f.submit([clips[i:i + 8]], staged[i:i + 8])
        f.wait()
        r.line(name, float(np.abs(staged - once).max()), "", f"{n}, batches of 8; 0 unless the kernels differ")


# ---------------------------------------------------------------- 4. predict

def predict_figure(r: Report, p, dev, entries, tmp: Path):
    by_class: dict[tuple[str, str], list] = {}
    for e in entries:
        by_class.setdefault((e.part, e.class_name), []).append(e)

    def classes(part):
        return [v for (pt, _), v in by_class.items() if pt == part][:2]

    # the cache the checkpoint records: 1 train video per class (never read by `mean`), 2 per val class
    cached = [v[0] for v in classes("train")] + [e for v in classes("val") for e in v[:2]]
    cache = tmp / "predict.h5"
    extract_features(cached, cache, settings(p, "fp32"), Backbone.load(None, 0), batch_size=p.e2e_batch,
                     workers=2, device="cpu", channels_last=True, progress=False)
    train(cache, tmp / "mean", TrainConfig(head="mean", n_way=2, val_episodes=2, val_query=1), progress=False,
          log=lambda *_: None)
    support, queries, truth = tmp / "support", [], []
    for v in classes("test"):
        k = min(2, len(v) - 1)
        for e in v[:k]:
            (support / e.class_name).mkdir(parents=True, exist_ok=True)
            shutil.copy(e.path, support / e.class_name / e.path.name)
        queries.append(str(v[k].path))
        truth.append(v[k].class_name)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    out = predict(tmp / "mean" / "seed-0" / "best.pt", support, queries, cache_root=tmp / "predict-cache", device=dev.type)
    seconds = time.perf_counter() - t
    used = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else 0.0
    where = ("cuda" if used > 0 else "cpu (no GPU memory was used)") if cuda else "cpu"
    got = [x.get("predicted") for x in out["results"]]
    errors = [x["error"] for x in out["results"] if "error" in x]
    r.line(f"predict on {dev.type}", seconds, "s",
           f"{len(queries)} queries vs {out['support_videos']} support videos of {len(out['classes'])} classes, "
           f"{out['decoded']} videos decoded, {sum(g == t for g, t in zip(got, truth))}/{len(truth)} right "
           f"(random-init MFNet), {len(errors)} query errors" + (f" ({errors[0]})" if errors else ""))
    r.line("predict ran on", where, "", f"{used:.1f} MB of GPU memory during predict" if cuda else "")


# ---------------------------------------------------------------- 5. training and eval

def synthetic_pooled(split: dict, seed: int = 0) -> dict:
    """part -> (x (videos, 3, 768) float32, class labels): a class centre plus noise per video, the
    centres small enough that accuracies are far from 1 (and ties between devices would show)."""
    rng = np.random.default_rng(seed)
    out = {}
    for part, (classes, per) in split.items():
        centres = 0.2 * rng.standard_normal((classes, 1, 3, 768), dtype=np.float32)
        x = centres + rng.standard_normal((classes, per, 3, 768), dtype=np.float32)
        out[part] = (x.reshape(classes * per, 3, 768), np.repeat(np.arange(classes), per))
    return out


def device_circle_loss(sims: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """episode_loss("circle", ...) with the other-class indices made on the scores' device."""
    n = sims.shape[1]
    others = (target[:, None] + torch.arange(1, n, device=sims.device)) % n
    return circle_loss(sims.gather(1, target[:, None]), sims.gather(1, others), 128.0, 0.4)


def episode(head, x: torch.Tensor, ep: np.ndarray, k_shot: int = 1):
    """Scores (N*Q, N) and targets of one episode (N, K+Q), as train.episode_scores makes them."""
    n, kq = ep.shape
    z = head.encode(x[torch.from_numpy(ep.reshape(-1)).to(x.device)]).unflatten(0, (n, kq))
    target = torch.arange(n, device=x.device).repeat_interleave(kq - k_shot)
    return head.scores(z[:, :k_shot], head.as_query(z[:, k_shot:].flatten(0, 1))), target


def train_rate(head, x: np.ndarray, labels: np.ndarray, dev, warm: int, episodes: int) -> float:
    """Episodes/s of 5-way 1-shot 1-query LSTM training with Adam, the library's defaults."""
    head = head.to(dev).train()
    xd = torch.from_numpy(x).to(dev)
    sampler = EpisodeSampler({c: np.flatnonzero(labels == c) for c in np.unique(labels)}, 5, 1, 1)
    rng = np.random.default_rng(0)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3, fused=True)

    def step():
        sims, target = episode(head, xd, sampler.sample(rng))
        loss = device_circle_loss(sims, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()   # the library reads every loss (finite check, curve): one sync per episode there too
    return rate(step, 1, warm, episodes, dev)


@torch.no_grad()
def eval_rate(head, x: np.ndarray, episodes: np.ndarray, dev, k_shot: int = 1, chunk: int = 500):
    """Episodes/s and per-episode accuracy as evaluate.episode_accuracies computes them, on `dev`:
    the features go to the device, every video is encoded once, episodes are scored `chunk` at a time."""
    head = head.to(dev).eval()
    sync(dev)
    t = time.perf_counter()
    xd = torch.from_numpy(x).to(dev)
    z = torch.cat([head.encode(xd[i:i + 4096]) for i in range(0, len(xd), 4096)])
    zq = head.as_query(z)
    n, kq = episodes.shape[1:]
    target = torch.arange(n, device=dev).repeat_interleave(kq - k_shot)
    acc = [(head.scores(z[e[:, :, :k_shot]], zq[e[:, :, k_shot:].flatten(1, 2)]).argmax(-1) == target).float().mean(-1)
           for e in torch.from_numpy(episodes).to(dev).split(chunk)]
    acc = torch.cat(acc).cpu().numpy()
    return len(episodes) / (time.perf_counter() - t), acc


def head_figures(r: Report, p, dev):
    cpu = torch.device("cpu")
    devices = [dev] if dev.type == "cpu" else [dev, cpu]
    data = synthetic_pooled(p.split)
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    n_videos = sum(len(x) for x, _ in data.values())
    print(f"# synthetic pooled cache: {n_videos} videos x 3 clips x 768 float32 in memory "
          f"({', '.join(f'{k} {c}x{v}' for k, (c, v) in p.split.items())} classes x videos)", flush=True)
    torch.manual_seed(0)
    lstm = heads.build("lstm", {"hidden": 512}, 768)

    with r.figure(f"episode_loss on {dev.type}"):
        g = torch.Generator().manual_seed(0)
        sims = (torch.rand(5, 5, generator=g) * 2 - 1).to(dev)
        target = torch.arange(5, device=dev)
        diff = (episode_loss("circle", sims, target, 128.0, 0.4, 10.0) - device_circle_loss(sims, target)).abs()
        r.line(f"episode_loss circle on {dev.type} vs device-side loss, abs diff", float(diff), "")
    if dev.type != "cpu":
        with r.figure(f"lstm loss and gradients {dev.type} vs cpu"):
            ep = EpisodeSampler({c: np.flatnonzero(ytr == c) for c in np.unique(ytr)}, 5, 1, 1).sample(
                np.random.default_rng(1))
            losses, grads = [], []
            for d in (dev, cpu):
                h = copy.deepcopy(lstm).to(d).train()
                loss = device_circle_loss(*episode(h, torch.from_numpy(xtr).to(d), ep))
                loss.backward()
                losses.append(float(loss))
                grads.append([q.grad.cpu() for q in h.parameters()])
            rel = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(*grads))
            r.line(f"lstm episode loss, {dev.type} vs cpu, abs diff", abs(losses[0] - losses[1]), "",
                   f"loss {losses[1]:.6g}")
            r.line(f"lstm gradients, {dev.type} vs cpu, max diff / max", rel, "")

    per = {}
    for d in devices:
        name = f"train lstm on {d.type}"
        with r.figure(name):
            per[d.type] = train_rate(copy.deepcopy(lstm), xtr, ytr, d, p.train_warm, p.train_episodes[d.type])
            r.line(name, per[d.type], "episodes/s", f"{p.train_episodes[d.type]} episodes, 5-way 1-shot 1 query, "
                   f"hidden 512, circle loss, Adam; {len(xtr)} train videos on {d.type}")
    if len(per) == 2:
        r.line(f"train lstm {dev.type} vs cpu", per[dev.type] / per["cpu"], "x")

    sampler = EpisodeSampler({c: np.flatnonzero(yte == c) for c in np.unique(yte)}, 5, 1, 15)
    rng = np.random.default_rng(0)
    eps = np.stack([sampler.sample(rng) for _ in range(p.eval_episodes)])
    what = f"{len(eps)} episodes, 5-way 1-shot 15 queries, {len(xte)} test videos encoded once"
    for hname, head in (("lstm", lstm), ("mean", heads.build("mean", {}, 768))):
        accs = {}
        for d in devices:
            name = f"eval {hname} on {d.type}"
            with r.figure(name):
                eps_s, accs[d.type] = eval_rate(copy.deepcopy(head), xte, eps, d)
                r.line(name, eps_s, "episodes/s", f"{what}; mean accuracy {accs[d.type].mean():.4f}")
        name = f"eval {hname} on cpu (library episode_accuracies)"
        with r.figure(name):
            feats = SplitFeatures.from_sequences(np.arange(len(xte)).astype(str), yte.astype(str), xte[:, None])
            t = time.perf_counter()
            lib = episode_accuracies(copy.deepcopy(head).eval(), feats, eps, 1)
            r.line(name, len(eps) / (time.perf_counter() - t), "episodes/s")
            if dev.type in accs:
                r.line(f"eval {hname}, {dev.type} vs cpu library, episodes with equal accuracy",
                       100.0 * float(np.mean(np.isclose(accs[dev.type], lib))), "%")


def library_figures(r: Report, p, dev, tmp: Path):
    from pipeline.fewshot.evaluate import evaluate
    from pipeline.fewshot.train import TrainConfig, train
    from pipeline.store import StoreWriter, VideoResult
    cache = tmp / "synthetic.h5"
    with StoreWriter(cache, dict(backbone="MFNet3D", dtype="float32", compression="none", note="synthetic"), {},
                     (768, 1, 1, 1), frames=2) as w:
        order = 0
        for part, (x, labels) in synthetic_pooled(p.split).items():
            for i, clips in enumerate(x):
                w.add(VideoResult(f"{part}{labels[i]}/{i}", f"{part}{labels[i]}", part, int(labels[i]), order,
                                  maps=clips[:, :, None, None, None], pooled=clips,
                                  frame_indices=np.zeros((3, 2), np.int32), n_views=1, n_frames=10))
                order += 1
    devices = [dev] if dev.type == "cpu" else [dev, torch.device("cpu")]
    for name, opts in (("lstm", {"hidden": 512}), ("otam", {"clips": 3})):
        accs = {}
        for d in devices:
            with r.figure(f"library {name} on {d.type}"):
                run = tmp / f"lib-{name}-{d.type}"
                n = p.train_episodes[d.type]
                small = p.split["val"][1] < 16          # --small: 2 validation videos a class
                res = train(cache, run, TrainConfig(head=name, head_options=opts, episodes=n, val_every=10 ** 6,
                                                    val_episodes=20, n_way=2 if small else 5,
                                                    val_query=1 if small else 15), progress=False, device=d.type)[0]
                if res["episodes"]:
                    r.line(f"library train {name} on {d.type}", n / max(res["seconds"] - res["val_seconds"], 1e-9),
                           "episodes/s", f"{n} episodes, pipeline.fewshot.train.train(device={d.type!r})")
                t = time.perf_counter()
                results, acc = evaluate([run], cache, episodes=p.eval_episodes, runs=1, device=d.type)
                accs[d.type] = acc[0][0]
                r.line(f"library eval {name} on {d.type}", time.perf_counter() - t, "s",
                       f"evaluate() of the run: best.pt and last.pt (scored once when identical), "
                       f"{p.eval_episodes} episodes; accuracy {results[0]['accuracy']:.4f}")
        if len(accs) == 2 and name == "otam":     # no training: the same episodes must score the same
            r.line(f"library eval otam, {dev.type} vs cpu, episodes with equal accuracy",
                   100.0 * float(np.mean(np.isclose(accs[dev.type], accs["cpu"]))), "%")


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny sizes (tests): short clips, few videos and episodes")
    ap.add_argument("--demo", help="an existing demo dataset (default: generate one in a temp dir)")
    ap.add_argument("--videos", type=int, default=0, help="demo videos extracted end to end (default: all; 6 with --small)")
    ap.add_argument("--out-json", help="also write every figure to this JSON file")
    a = ap.parse_args()
    if a.small:
        # tiny ops: waking a second thread costs more than it saves, and on a loaded test machine
        # every such wake-up can wait for a time slice (seconds per tiny MFNet forward)
        torch.set_num_threads(1)
    dev = pick_device(a.device)
    p = plan(dev, a.small)
    r = Report(dev)
    if dev.type == "cuda":
        r.line("device", torch.cuda.get_device_name(dev), "",
               f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
               f"TF32 convolutions {torch.backends.cudnn.allow_tf32}, TF32 matmul "
               f"{torch.backends.cuda.matmul.allow_tf32}")
    else:
        r.line("device", "cpu", "", f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    r.line("CPUs", CPUS, "cores")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        tmp = Path(tmp)
        forward, entries = {}, []
        with r.step("forward only"):
            forward = forward_figures(r, p, dev)
        with r.step("demo dataset"):
            entries = demo_dataset(r, a, p, tmp)
        with r.step("extract end to end"):
            extract_figures(r, a, p, dev, entries, forward, tmp)
        with r.step("features"):
            feature_figures(r, p, dev, entries)
        with r.step("predict"):
            predict_figure(r, p, dev, entries, tmp)
        with r.step("train and eval"):
            head_figures(r, p, dev)
        with r.step("library train and eval"):
            library_figures(r, p, dev, tmp)
    r.line("total time", time.perf_counter() - t0, "s", f"{len(r.failed)} failed")
    if a.out_json:
        Path(a.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out_json).write_text(json.dumps(dict(args=vars(a), figures=r.figures, failed=r.failed), indent=1,
                                               default=str))
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
