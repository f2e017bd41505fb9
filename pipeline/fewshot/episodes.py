"""N-way K-shot episodes: drawn fresh for training, a fixed file of video ids for val and test, or a
file of fixed clip sequences imported from another tool's saved episodes."""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np

from ..errors import PipelineError
from ..files import atomic_path


class EpisodeError(PipelineError):
    pass


class EpisodeSampler:
    """Draws (N classes, K support + Q query videos per class) from `videos_by_class`
    (class name -> array of video indices), with the Generator passed in."""

    def __init__(self, videos_by_class: dict[str, np.ndarray], n_way: int, k_shot: int, q_query: int):
        need = k_shot + q_query
        small = sorted((c, len(v)) for c, v in videos_by_class.items() if len(v) < need)
        names = ", ".join(f"{c} ({n} videos)" for c, n in small[:5]) + (", ..." if len(small) > 5 else "")
        usable = len(videos_by_class) - len(small)
        if usable < n_way:
            raise EpisodeError(f"{n_way}-way episodes need {n_way} classes with at least K+Q = {need} videos; "
                               f"{usable} of {len(videos_by_class)} have them" + (f" (short: {names})" if small else ""))
        if small:     # e.g. videos missing from a download: the class is left out, and said so
            warnings.warn(f"{len(small)} class(es) with fewer than K+Q = {need} videos left out of the episodes: "
                          f"{names}", stacklevel=2)
        self.excluded = [c for c, _ in small]
        self.classes = sorted(c for c in videos_by_class if c not in self.excluded)
        self.videos = {c: np.asarray(videos_by_class[c]) for c in self.classes}
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """(N, K + Q) video indices: row c is class c of the episode, support first."""
        picked = rng.choice(len(self.classes), self.n_way, replace=False)
        return np.stack([rng.choice(self.videos[self.classes[c]], self.k_shot + self.q_query, replace=False)
                         for c in picked])


def episode_file(cache: Path, ids, part: str, n_way: int, k_shot: int, q_query: int, count: int, seed: int) -> Path:
    """Where the fixed episodes of (part, N, K, Q, count, seed) drawn from the videos `ids` live: the name
    holds a digest of the videos in their order (the order the sampler draws from), so a cache whose
    part holds other videos, or the same in another order, never reuses them."""
    cache = Path(cache)
    digest = hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:12]
    return cache.with_name(cache.stem + ".episodes") / f"{part}-{n_way}w{k_shot}s{q_query}q-{count}-seed{seed}-{digest}.npz"


def episodes_digest(ids, episodes: np.ndarray) -> str:
    """What a set of fixed episodes is, independent of where it is stored: a digest of the video ids
    of every episode, in order. Two results may be paired only if their digests are equal."""
    return hashlib.sha256("\n".join(np.asarray(ids)[episodes.ravel()]).encode()).hexdigest()[:16]


def fixed_episodes(cache: Path, ids: np.ndarray, videos_by_class: dict, part: str, n_way: int, k_shot: int,
                   q_query: int, count: int, seed: int) -> np.ndarray:
    """The fixed episode list for (part, N, K, Q, count, seed): (count, N, K+Q) indices into `ids`.

    Generated once and saved beside the cache as video ids; every later call (any head, any run)
    reads the same file, so all methods are scored on the very same episodes.
    """
    path = episode_file(cache, ids, part, n_way, k_shot, q_query, count, seed)
    pos = {v: i for i, v in enumerate(ids)}
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            names, eps = z["ids"], z["episodes"]
        missing = [n for n in names if n not in pos]
        if missing:
            raise EpisodeError(f"{path} names {len(missing)} video(s) not in the cache (e.g. {missing[0]}); "
                               "it belongs to another cache")
        return np.array([pos[n] for n in names], dtype=np.int64)[eps]
    sampler = EpisodeSampler(videos_by_class, n_way, k_shot, q_query)
    rng = np.random.default_rng(seed)
    eps = np.stack([sampler.sample(rng) for _ in range(count)])
    used = np.unique(eps)
    local = np.searchsorted(used, eps)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, ids=np.array([ids[u] for u in used]), episodes=local.astype(np.int32),
                            meta=json.dumps(dict(part=part, n_way=n_way, k_shot=k_shot, q_query=q_query, count=count,
                                                 seed=seed)))
    return eps


def save_sequences(path, ids, episodes: np.ndarray, positions: np.ndarray, meta: dict) -> None:
    """Episodes whose members are fixed clip sequences: `episodes` (E, N, K+Q) indices into `ids`,
    `positions` (E, N, K+Q, T) the clip of each step, `meta` what they are (n_way, k_shot, q_query,
    count, clips, part, source)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, ids=np.asarray(ids, dtype=str), episodes=episodes.astype(np.int32),
                            positions=positions.astype(np.int32), meta=json.dumps(dict(meta, kind="sequences")))


def load_sequences(path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(ids, episodes, positions, meta) of a file written by `save_sequences`."""
    path = Path(path)
    if not path.is_file():
        raise EpisodeError(f"episode file {path} does not exist (`pipeline import-episodes` writes one)")
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, eps, pos, meta = z["ids"], z["episodes"], z["positions"], json.loads(str(z["meta"]))
    except (OSError, KeyError, ValueError) as e:
        raise EpisodeError(f"{path}: not an episode file of fixed sequences ({e})") from None
    return ids, eps, pos, meta


def sequences_digest(ids, episodes: np.ndarray, positions: np.ndarray) -> str:
    """Like `episodes_digest`, with each member's clip positions: the same videos sampled at other
    clips are other episodes."""
    h = hashlib.sha256("\n".join(np.asarray(ids)[episodes.ravel()]).encode())
    h.update(np.ascontiguousarray(positions, dtype=np.int32).tobytes())
    return h.hexdigest()[:16]
