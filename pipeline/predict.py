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

from .backbones.mfnet import MFNet3D, random_mfnet, sha256
from .datasets import scan
from .episodes import cosine_scores, prototypes
from .evaluate import load_checkpoint
from .extract import BatchForward, ExtractSettings, pick_device, pool_maps
from .store import settings_hash
from .video import VIDEO_EXTENSIONS, VideoError, read_clips


class PredictError(Exception):
    pass


@dataclass
class Embedded:
    pooled: np.ndarray    # (T, 768) float32
    maps: np.ndarray      # (768, t, h, w) float16, the clip mean (relation heads)
    cached: bool


def backbone_for(ck: dict, weights: str | None) -> MFNet3D:
    """The backbone the checkpoint's cache was made with; `weights` overrides the recorded path."""
    settings = ck["cache"]["settings"]
    if settings["weights"] == "random":
        if weights:
            raise PredictError(f"the checkpoint was trained on features of a random-init MFNet, not on {weights}")
        return random_mfnet(settings["seed"]).eval()
    path = weights or ck["cache"].get("provenance", {}).get("weights_path")
    if not path or not Path(path).is_file():
        raise PredictError(f"the checkpoint needs the MFNet weights it was trained with "
                           f"(sha256 {settings['weights'][:12]}...); pass --weights")
    if sha256(path) != settings["weights"]:
        raise PredictError(f"{path} is not the MFNet checkpoint the head was trained with (sha256 differs from "
                           f"{settings['weights'][:12]}...)")
    return MFNet3D.from_checkpoint(path).eval()


class Embedder:
    def __init__(self, ck: dict, weights: str | None, cache_root="cache/predict", device="auto"):
        self.settings = ExtractSettings.from_dict(ck["cache"]["settings"])
        self.key = settings_hash(ck["cache"]["settings"])
        self.dir = Path(cache_root) / self.key
        self._model = None
        self.weights, self.device, self.ck = weights, device, ck
        self.decoded = 0

    def forward(self):
        if self._model is None:
            self._model = BatchForward(backbone_for(self.ck, self.weights), pick_device(self.device), self.settings,
                                       channels_last=True)
        return self._model

    def __call__(self, path: Path) -> Embedded:
        digest = sha256(path)
        f = self.dir / f"{digest}.npz"
        if f.exists():
            with np.load(f) as z:
                return Embedded(z["pooled"], z["maps"], True)
        s = self.settings
        vc = read_clips(path, s.sampling, s.preprocess, views=1, raw=True)
        self.decoded += 1
        maps = self.forward()(vc.clips[0])                       # (T, 768, t, h, w)
        e = Embedded(pool_maps(maps), maps.mean(0).astype(np.float16), False)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f.stem + ".tmp.npz")
        np.savez(tmp, pooled=e.pooled, maps=e.maps)
        tmp.replace(f)
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
def predict(checkpoint, support_dir, queries, weights: str | None = None, cache_root="cache/predict",
            device: str = "auto") -> dict:
    """Per query: predicted class, similarity to every class, margin; plus what failed and why."""
    head, ck = load_checkpoint(checkpoint)
    found, problems = scan(support_dir)
    if len(found) < 2:
        raise PredictError(f"{support_dir}: need at least 2 class folders of example videos, found {len(found)}")
    embed = Embedder(ck, weights, cache_root, device)
    classes, protos, failures = [], [], [(f, why) for f, why in problems]
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
        protos.append(vids)
    reused_support = sum(v.cached for vs in protos for v in vs)
    results = []
    if head.kind == "embedding":  # classes may have different K: one prototype at a time
        centres = torch.cat([prototypes(head(torch.from_numpy(np.stack([v.pooled for v in vs])))[None])
                             for vs in protos])
    else:
        centres = torch.stack([torch.from_numpy(np.stack([v.maps for v in vs])).float().mean(0) for vs in protos])
    for q in query_files(queries):
        try:
            e = embed(q)
        except VideoError as err:
            results.append(dict(query=str(q), error=err.reason))
            continue
        if head.kind == "embedding":
            sims = cosine_scores(head(torch.from_numpy(e.pooled)[None]), centres)[0]
        else:
            sims = head(centres, torch.from_numpy(e.maps).float()[None])[0]
        order = torch.argsort(sims, descending=True)
        results.append(dict(query=str(q), predicted=classes[order[0]],
                            margin=float(sims[order[0]] - sims[order[1]]),
                            scores={c: float(s) for c, s in zip(classes, sims)}))
    return dict(checkpoint=str(checkpoint), head=ck["head"], classes=classes, results=results,
                support_failures=failures, decoded=embed.decoded, reused_support=reused_support,
                support_videos=sum(len(v) for v in protos))


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
