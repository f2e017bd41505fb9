"""Few-shot recognition of new, user-defined classes with a trained head.

Videos are embedded with exactly the sampling, preprocessing, layer and precision recorded in the
checkpoint's cache settings (view 0), by the backbone those settings name. Per-video results are
cached under `cache/predict/<settings hash>/<sha256 of the file>.npz`, so a second run re-uses
every video it has seen (support or query) and only new or changed files are decoded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import PipelineError
from ..device import pick_device
from ..extraction.backbone import Backbone, BatchForward
from ..extraction.datasets import scan
from ..extraction.settings import ExtractSettings
from ..extraction.video import VIDEO_EXTENSIONS, VideoError, read_clips_or_reason
from ..fewshot import checkpoint
from ..fewshot.evaluate import check_scores
from ..fewshot.features import segment_picks
from ..files import atomic_path, check_output, sha256
from ..store import pool_maps, settings_hash, step_maps


class PredictError(PipelineError):
    pass


@dataclass
class Embedded:
    pooled: np.ndarray    # (T, 768) float32
    steps: np.ndarray     # (T, t, 768) float16, the per-step view
    maps: np.ndarray      # (768, t, h, w) float16, the clip mean (map heads)
    cached: bool

    def features(self, head) -> torch.Tensor:
        """What `head` reads of this video, as evaluation reads it from a cache: the clip-mean map, or
        the middle clip (or its steps) of each of the head's T segments."""
        if head.view == "maps":
            return torch.from_numpy(self.maps).float()
        seq = self.pooled if head.view == "pooled" else self.steps
        picked = seq[segment_picks(np.array([len(seq)]), head.clips or len(seq))[0]]
        return torch.from_numpy(picked.reshape(-1, picked.shape[-1])).float()    # (T [* t], 768)


class Embedder:
    def __init__(self, ck: checkpoint.Checkpoint, weights: str | None, cache_root="cache/predict", device="auto"):
        self.settings = ExtractSettings.from_dict(ck.cache["settings"])
        self.key = settings_hash(ck.cache["settings"])
        self.dir = Path(cache_root) / self.key
        self._model = None
        self.weights, self.device, self.ck = weights, device, ck
        self.decoded = 0

    def forward(self):
        if self._model is None:
            backbone = Backbone.recorded(self.ck.cache["settings"], self.ck.cache.get("provenance", {}), self.weights)
            self._model = BatchForward(backbone.model, pick_device(self.device), self.settings, channels_last=True)
        return self._model

    def __call__(self, path: Path) -> Embedded:
        path = Path(path)
        if not path.exists():
            raise VideoError(path, "no such file")
        if not path.is_file():      # opening a FIFO or a device would block or read forever
            raise VideoError(path, "not a regular file (a folder, FIFO or device); only regular files are read")
        try:
            digest = sha256(path)
        except OSError as e:
            raise VideoError(path, f"cannot be read ({e.strerror or e})") from None
        f = self.dir / f"{digest}.npz"
        if f.exists():
            with np.load(f) as z:
                if "steps" in z:        # files of the first version lack the per-step view: embedded again
                    return Embedded(z["pooled"], z["steps"], z["maps"], True)
        s = self.settings
        vc, why = read_clips_or_reason(path, s.sampling, s.preprocess, 1, 0, False)
        if vc is None:
            raise VideoError(path, why)
        self.decoded += 1
        maps = self.forward()(vc.clips[0])                       # (T, 768, t, h, w)
        e = Embedded(pool_maps(maps), step_maps(maps), maps.mean(0).astype(np.float16), False)
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(f, suffix=".npz") as tmp:
            np.savez(tmp, pooled=e.pooled, steps=e.steps, maps=e.maps)
        return e


def query_files(queries) -> list[Path]:
    out = []
    for q in map(Path, queries):
        if q.is_dir():
            out += sorted(p for p in q.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
        else:
            out.append(q)
    return out


@torch.no_grad()
def predict(checkpoint_path, support_dir, queries, weights: str | None = None, cache_root="cache/predict",
            device: str = "auto", head_file: str | None = None) -> dict:
    """Per query: predicted class, the head's score for every class, margin; plus what failed and why."""
    ck = checkpoint.load(checkpoint_path)
    head = ck.build_head(head_file)
    query_paths = query_files(queries)
    if not query_paths:
        raise PredictError(f"no query video in {', '.join(map(str, queries)) or 'the arguments'}: give video files, "
                           "or folders that hold them")
    check_output(cache_root, "predict cache folder (--cache-dir)", folder=True)
    if not Path(support_dir).is_dir():
        raise PredictError(f"--support {support_dir} does not exist or is not a folder (one folder of example "
                           "videos per class)")
    found, problems = scan(support_dir)
    if len(found) < 2:
        raise PredictError(f"{support_dir}: need at least 2 class folders of example videos, found {len(found)}")
    embed = Embedder(ck, weights, cache_root, device)
    classes, support, failures = [], [], [(f, why) for f, why in problems]
    for c, files in found.items():
        vids = []
        for f in files:
            try:
                vids.append(embed(f))
            except VideoError as e:
                failures.append((str(f), e.reason))
        if not vids:
            raise PredictError(f"{Path(support_dir) / c}: no readable video in this class folder")
        classes.append(c)
        support.append(vids)
    reused_support = sum(v.cached for vs in support for v in vs)
    encoded = [head.encode(torch.stack([v.features(head) for v in vs])) for vs in support]  # (K_c, ...)
    same_k = len({len(z) for z in encoded}) == 1

    def class_scores(zq):
        """(classes,) scores of one encoded query: one episode when every class has the same K, else
        each class on its own (the protocol lets a class's score depend only on its own support)."""
        if same_k:
            return head.scores(torch.stack(encoded), zq)[0]
        return torch.cat([head.scores(z[None], zq)[0] for z in encoded])

    results = []
    for q in query_paths:
        try:
            e = embed(q)
        except VideoError as err:
            results.append(dict(query=str(q), error=err.reason))
            continue
        sims = class_scores(head.as_query(head.encode(e.features(head)[None])))
        check_scores(sims[None], lambda _: f"query {q}")
        order = torch.argsort(sims, descending=True)
        results.append(dict(query=str(q), predicted=classes[order[0]],
                            margin=float(sims[order[0]] - sims[order[1]]),
                            scores={c: float(s) for c, s in zip(classes, sims)}))
    return dict(checkpoint=str(checkpoint_path), head=ck.head, classes=classes, results=results,
                support_failures=failures, decoded=embed.decoded, reused_support=reused_support,
                support_videos=sum(len(v) for v in support))


def format_table(out: dict) -> str:
    classes = out["classes"]
    w = max(len(c) for c in classes)
    lines = [f"{'query':40s} {'predicted':{w}s} {'margin':>7s}  " + " ".join(f"{c[:10]:>10s}" for c in classes)]
    for r in out["results"]:
        name = Path(r["query"]).name[-40:]
        if "error" in r:
            lines.append(f"{name:40s} could not be read: {r['error']}")
        else:
            lines.append(f"{name:40s} {r['predicted']:{w}s} {r['margin']:7.3f}  "
                         + " ".join(f"{r['scores'][c]:10.3f}" for c in classes))
    return "\n".join(lines)


def to_json(out: dict) -> str:
    return json.dumps(out, indent=1)
