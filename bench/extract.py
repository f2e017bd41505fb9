"""Stage-one benchmark: MFNet cost and throughput on this machine, end-to-end extraction on the demo.

    python bench/extract.py [--videos N] [--demo data/demo]
    python bench/extract.py --null-backbone [--workers 1 2] [--videos N]

Prints: MACs per clip, forward-only clips/s (fp32, channels-last, bf16) with achieved GFLOP/s, the
machine's dense conv3d GFLOP/s, end-to-end `pipeline extract` clips/s on the whole demo (fp32 and
bf16; `--videos N` for a subset) and its ratio to forward-only in the same run, the cosine
similarity of bf16 vs fp32 pooled features, and (if cache/demo.h5 exists) the nearest-prototype
accuracy of mean-pooled vs concatenated clip features of the random network on the demo test classes.

--null-backbone: the pipeline's own ceiling, with no network: `extract` with a backbone that returns
zeros of MFNet's output shape at once and does not use the CPU (as a GPU), beside decode only (the
pipeline's worker processes decoding alone: no network, no store), for each worker count, and their ratio
(the issue's target: >= 0.9). The whole `extract` call is timed: file hashing and the merge count.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.extraction.mfnet import random_mfnet  # noqa: E402
from pipeline.extraction.datasets import load_split, resolve  # noqa: E402
from pipeline.extraction.backbone import Backbone, retain_freed_memory  # noqa: E402
from pipeline.extraction.workers import Workers  # noqa: E402
from pipeline.extraction.extractor import extract_features  # noqa: E402
from pipeline.extraction.settings import ExtractSettings  # noqa: E402
from pipeline.store import FeatureStore  # noqa: E402

warnings.filterwarnings("ignore")


def macs_per_clip(model, shape=(1, 3, 16, 112, 112)) -> int:
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, torch.nn.Conv3d):
            total += out.numel() * (m.in_channels // m.groups) * int(np.prod(m.kernel_size))
        elif isinstance(m, torch.nn.Linear):
            total += m.in_features * m.out_features
    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Linear))]
    with torch.inference_mode():
        model(torch.zeros(shape))
    for h in hs:
        h.remove()
    return total


def rate(fn, items, warm=1, reps=3) -> float:
    for _ in range(warm):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return items * reps / (time.perf_counter() - t)


FORWARDS = (("fp32", False, None), ("fp32 channels-last", True, None), ("bf16 channels-last", True, torch.bfloat16))


def forward_rate(model, x, channels_last: bool, dtype, reps: int = 10) -> float:
    """Clips/s of the backbone alone on a ready batch `x` (about 2-5 s of work)."""
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    m, xi = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)

    def f():
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            m.forward_features(xi)
    return rate(f, len(x), reps=reps)


class NullForward:
    """A network as fast as a GPU's, seen from the CPU: uint8 (B, F, H, W, 3) clips -> zeros of MFNet's
    maps (B, 768, F/2, ceil(H/32), ceil(W/32)) at once, with the host's share of the CUDA path (the
    clips copied into a reused batch buffer, the maps copied out) and no normalisation (a GPU does that)."""
    on_cpu = False
    submitted = 0

    def __init__(self):
        self.staging = np.empty(0, np.uint8)

    def __call__(self, clips):
        b, f, h, w, _ = clips.shape
        return np.zeros((b, 768, f // 2, -(-h // 32), -(-w // 32)), np.float32)

    def submit(self, pieces, out):
        shape = (sum(len(p) for p in pieces), *pieces[0].shape[1:])
        if self.staging.size < np.prod(shape):
            self.staging = np.empty(np.prod(shape), np.uint8)
        np.concatenate(pieces, out=self.staging[:np.prod(shape)].reshape(shape))
        out[...] = 0
        self.submitted += 1

    def wait(self, upto=None):
        pass


class NullBackbone(Backbone):
    def batch_forward(self, device, settings, channels_last):
        return NullForward()


def decode_only(entries, workers: int, settings: ExtractSettings, part_size: int = 32) -> float:
    """Clips/s of the pipeline's readers alone (its worker processes decoding, part by part as `extract`
    submits them, the next part in flight), no network, no store; the time to start the processes counts."""
    t, clips = time.perf_counter(), 0          # starting the processes counts, as it does in `extract`
    hw = -(-settings.preprocess.crop // 32)
    d = Workers(workers, settings, part_size, (768, settings.sampling.frames // 2, hw, hw))   # MFNet's maps
    try:
        parts = [entries[k:k + part_size] for k in range(0, len(entries), part_size)]
        nxt = d.submit(parts[0])
        for j in range(len(parts)):
            part, got = nxt, nxt.result()
            if j + 1 < len(parts):
                nxt = d.submit(parts[j + 1])
            clips += sum(vc.clips.shape[0] * vc.clips.shape[1] for vc, _ in got if vc is not None)
            del got
            part.release()
        return clips / (time.perf_counter() - t)
    finally:
        d.close()


def null_backbone(entries, workers_list, batch: int, compression: str, rounds: int) -> None:
    """Best of `rounds` (decode only and extract alternating) of each, for each worker count; extract is
    timed as a whole call (hashing the files, parts, the merge), not its loop alone."""
    s = ExtractSettings(precision="fp32", compression=compression)
    backbone = NullBackbone(None, None, "random", 0)
    for w in workers_list:
        decode, whole, cpu = 0.0, 0.0, []
        for _ in range(rounds):
            tmp = Path(tempfile.mkdtemp())
            t, c = time.perf_counter(), time.process_time()
            r = extract_features(entries, tmp / "null.h5", s, backbone, batch_size=batch, workers=w, progress=False)
            whole = max(whole, r["computed_clips"] / (time.perf_counter() - t))
            cpu.append((time.process_time() - c) / r["computed_clips"] * 1e3)
            shutil.rmtree(tmp)
            decode = max(decode, decode_only(entries, w, s))
        print(f"{w} worker(s): decode only {decode:.1f} clips/s; extract ({compression}) with the null backbone "
              f"{whole:.1f} clips/s = {whole / decode:.2f} x decode only (best of {rounds}); the main process's "
              f"own CPU {min(cpu):.2f} ms a clip, its bound with cores to spare {1e3 / min(cpu):.0f} clips/s "
              f"(decoding: {1e3 * w / decode:.1f} ms a clip per worker at full speed)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=0, help="demo videos extracted end to end (0: all)")
    ap.add_argument("--demo", default="data/demo")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[2])
    ap.add_argument("--null-backbone", action="store_true", help="the pipeline's ceiling beside decode only")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                    help="end-to-end runs (bf16 is emulated, 50x slower, on CPUs without avx512_bf16 or AMX)")
    ap.add_argument("--rounds", type=int, default=2, help="with --null-backbone: best of this many")
    ap.add_argument("--compression", nargs="+", default=["lzf", "blosc-lz4"], help="with --null-backbone")
    a = ap.parse_args()
    if a.null_backbone:
        entries, _ = resolve(load_split(Path(a.demo) / "splits"), a.demo)
        if a.videos:
            entries = entries[:: max(1, len(entries) // a.videos)][: a.videos]
        for comp in a.compression:
            null_backbone(entries, a.workers, a.batch, comp, a.rounds)
        return
    torch.manual_seed(0)
    model = random_mfnet(0).eval()
    macs = macs_per_clip(model)
    # the allocator setting `extract` uses on CPU, so forward-only and end-to-end run alike
    print(f"threads: {torch.get_num_threads()}; freed memory kept for reuse: {retain_freed_memory()}")
    print(f"MFNet MACs per clip (16x112x112): {macs / 1e9:.2f} GMAC ({2 * macs / 1e9:.2f} GFLOP)")
    x = torch.randn(a.batch, 3, 16, 112, 112)
    rows = []
    with torch.inference_mode():
        for name, cl, dt in FORWARDS:
            r = forward_rate(model, x, cl, dt)
            rows.append((name, r))
            print(f"forward only, batch {a.batch}, {name:20s}: {r:6.1f} clips/s = {2 * macs * r / 1e9:6.1f} GFLOP/s")
        conv = torch.nn.Conv3d(256, 256, 3, padding=1).eval()
        xc = torch.randn(8, 256, 8, 14, 14)
        conv_macs = 8 * 256 * 8 * 14 * 14 * 256 * 27
        for name, cl, dt in (("fp32", True, None), ("bf16", True, torch.bfloat16)):
            cm = conv.to(memory_format=torch.channels_last_3d)
            xi = xc.contiguous(memory_format=torch.channels_last_3d)

            def g():
                with torch.autocast("cpu", dtype=dt, enabled=dt is not None):
                    cm(xi)
            peak = 2 * conv_macs * rate(g, 1) / 1e9
            best = max(r for n, r in rows if n.startswith(name))
            print(f"dense conv3d 256->256 3x3x3 ({name}): {peak:6.1f} GFLOP/s; MFNet reaches "
                  f"{2 * macs * best / 1e9 / peak:.0%} of it")
    split = load_split(Path(a.demo) / "splits")
    entries, _ = resolve(split, a.demo)
    if a.videos:
        entries = entries[:: max(1, len(entries) // a.videos)][: a.videos]
    tmp = Path(tempfile.mkdtemp())
    pooled = {}
    for prec in a.precisions:
        # forward-only again right before, so that the ratio compares the same moment of a shared machine
        fwd = forward_rate(model, x, True, None if prec == "fp32" else torch.bfloat16)
        s = ExtractSettings(precision=prec)
        r = extract_features(entries, tmp / f"{prec}.h5", s, Backbone.load(None, 0), batch_size=a.batch, workers=a.workers[0], channels_last=True,
                    progress=False)
        print(f"end-to-end extract, {len(entries)} demo videos, {prec}: {r['clips_per_s']:.1f} clips/s "
              f"({r['computed_clips']} clips in {r['seconds']:.1f} s) = {r['clips_per_s'] / fwd:.2f} x forward only "
              f"({fwd:.1f} clips/s just before); "
              f"{r['bytes'] / r['clips'] / 1e3:.1f} KB per clip")
        with FeatureStore(tmp / f"{prec}.h5") as st:
            pooled[prec] = st.f["pooled"][:]
            raw = st.f["features"].id.get_storage_size() if hasattr(st.f["features"].id, "get_storage_size") else 0
            nbytes = st.f["features"].size * st.f["features"].dtype.itemsize
            if raw:
                print(f"  maps: {nbytes / st.f['features'].shape[0] / 1e3:.1f} KB/clip raw float16, "
                      f"{raw / st.f['features'].shape[0] / 1e3:.1f} KB/clip lzf (ratio {nbytes / raw:.2f})")
    if {"fp32", "bf16"} <= set(pooled):
        a32, b16 = pooled["fp32"], pooled["bf16"]
        cos = (a32 * b16).sum(1) / (np.linalg.norm(a32, axis=1) * np.linalg.norm(b16, axis=1))
        print(f"bf16 vs fp32 pooled features: cosine min {cos.min():.5f}, mean {cos.mean():.5f}")
    shutil.rmtree(tmp)
    demo_cache = Path("cache/demo.h5")
    if demo_cache.exists():
        with FeatureStore(demo_cache) as st:
            sel = np.flatnonzero(st.videos["part"] == "test")
            seq = st.pooled_sequences(sel)                        # (n, T, 768)
            labels = st.videos["class_name"][sel]
        for name, feat in (("mean-pooled", seq.mean(1)), ("concatenated clips", seq.reshape(len(seq), -1))):
            print(f"random-init MFNet, demo test classes, leave-one-out nearest prototype ({name}): "
                  f"{nearest_prototype(feat, labels):.1%}")


def nearest_prototype(x, labels) -> float:
    """Leave-one-out: each video against the cosine prototypes of all classes (its own without it)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    classes = np.unique(labels)
    correct = 0
    for i in range(len(x)):
        protos = []
        for c in classes:
            m = (labels == c) & (np.arange(len(x)) != i)
            p = x[m].mean(0)
            protos.append(p / np.linalg.norm(p))
        correct += classes[np.argmax(np.stack(protos) @ x[i])] == labels[i]
    return correct / len(x)


if __name__ == "__main__":
    main()
