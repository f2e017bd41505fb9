"""Cache-write and cache-read cost of the maps' HDF5 filters, alone (no network, no decoding).

    python bench/store.py [--rows 1000] [--cache cache/demo.h5] [--rounds 3]

Writes `--rows` clip maps (taken from the demo cache when it exists, so they compress as real
MFNet maps do; else ReLU'd noise of the demo's shape) one chunk per clip, as `StoreWriter` does,
with each filter pipeline the cache can use, then reads them back in blocks of 256 rows as
training does. Prints clips/s for both and KB per clip: the best of `--rounds` rounds, filters
alternating within a round so that the machine's drift falls on all of them.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.store import COMPRESSION  # noqa: E402


def sample_maps(cache: Path, rows: int) -> np.ndarray:
    if cache.exists():
        with h5py.File(cache, "r") as f:
            return f["features"][:rows]
    rng = np.random.default_rng(0)
    return np.maximum(rng.normal(size=(rows, 768, 8, 4, 4)), 0).astype(np.float16)


def one_round(maps: np.ndarray, filters: dict, folder: Path) -> dict:
    out = {}
    for name, opts in filters.items():
        path = folder / f"{name}.h5"
        t = time.perf_counter()
        with h5py.File(path, "w") as f:
            ds = f.create_dataset("features", (0, *maps.shape[1:]), maps.dtype, maxshape=(None, *maps.shape[1:]),
                                  chunks=(1, *maps.shape[1:]), **opts)
            for lo in range(0, len(maps), 256):          # StoreWriter flushes every 256 clips
                block = maps[lo:lo + 256]
                ds.resize(lo + len(block), axis=0)
                ds[lo:] = block
        write = time.perf_counter() - t
        t = time.perf_counter()
        with h5py.File(path, "r") as f:
            for lo in range(0, len(maps), 256):
                f["features"][lo:lo + 256]
        read = time.perf_counter() - t
        out[name] = (write, read, path.stat().st_size)
        path.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--cache", type=Path, default=Path("cache/demo.h5"))
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    maps = sample_maps(a.cache, a.rows)
    filters = {}
    for comp in ("none", "lzf", "blosc-lz4"):
        filters[comp] = COMPRESSION[comp]
        filters[f"{comp}+fletcher32"] = dict(COMPRESSION[comp], fletcher32=True)
    best: dict[str, list] = {}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for _ in range(a.rounds):
            for name, (w, r, size) in one_round(maps, filters, Path(tmp)).items():
                b = best.setdefault(name, [w, r, size])
                b[0], b[1] = min(b[0], w), min(b[1], r)
    print(f"{len(maps)} clip maps {maps.shape[1:]} {maps.dtype} from {a.cache if a.cache.exists() else 'noise'}, "
          f"best of {a.rounds}")
    print(f"{'filters':20s} {'write clips/s':>14s} {'read clips/s':>13s} {'KB/clip':>8s}")
    for name, (w, r, size) in best.items():
        print(f"{name:20s} {len(maps) / w:14.0f} {len(maps) / r:13.0f} {size / len(maps) / 1e3:8.1f}")


if __name__ == "__main__":
    main()
