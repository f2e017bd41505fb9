"""Small caches written directly in the cache format, for stage-two tests."""
import numpy as np

from pipeline.store import StoreWriter, VideoResult

SETTINGS = dict(backbone="MFNet3D", dtype="float32", compression="none", note="synthetic")


def write_cache(path, pooled_by_class: dict, parts: dict, map_shape=(768, 2, 1, 1), settings=None, views=1):
    """pooled_by_class: class -> (videos, T, 768) array; parts: class -> train/val/test.
    Maps are the pooled vector broadcast over the map's positions, so both views agree; `views`
    crop views hold the same clips."""
    s = dict(SETTINGS, **(settings or {}))
    w = StoreWriter(path, s, {"synthetic": True}, map_shape, frames=2)
    order = 0
    for label, (c, x) in enumerate(pooled_by_class.items()):
        for i, clips in enumerate(x):
            clips = np.concatenate([clips] * views)                    # view-major rows
            maps = np.broadcast_to(clips[:, :, None, None, None], (len(clips), *map_shape)).copy()
            w.add(VideoResult(f"{c}/{c}_{i}", c, parts[c], label, order, maps=maps, pooled=clips,
                              frame_indices=np.zeros((len(clips) // views, 2), np.int32), n_views=views,
                              n_frames=10))
            order += 1
    w.close()
    return path


def order_cache(path, n_pairs=4, videos=20, noise=0.3, seed=0, parts=None):
    """Classes in reversed pairs: class 2p sees clip patterns (a, b, c), class 2p+1 sees (c, b, a).
    The mean of the clips is the same for both classes of a pair; only the order differs."""
    rng = np.random.default_rng(seed)
    data = {}
    for p in range(n_pairs):
        base = rng.normal(size=(3, 768))
        for r, seq in enumerate((base, base[::-1])):
            data[f"pair{p}_{'fwd' if r == 0 else 'rev'}"] = seq[None] + noise * rng.normal(size=(videos, 3, 768))
    parts = parts or {c: ("test" if c.startswith(f"pair{n_pairs - 1}") else "val" if c.startswith(f"pair{n_pairs - 2}")
                          else "train") for c in data}
    return write_cache(path, {c: v.astype(np.float32) for c, v in data.items()}, parts)
