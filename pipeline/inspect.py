"""`pipeline info`: what a cache or a checkpoint holds, in a few readable lines."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .store import FeatureStore


def describe(path) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix in (".h5", ".hdf5"):
        return describe_cache(path)
    return describe_checkpoint(path)


def describe_cache(path: Path) -> str:
    with FeatureStore(path) as s:
        feats = s.f["features"]
        v = s.videos
        lines = [f"cache {path}: {path.stat().st_size / 1e6:.1f} MB, {len(s)} videos, {feats.shape[0]} clip rows",
                 f"features {feats.shape[1:]} {feats.dtype}, compression {feats.compression or 'none'}",
                 "settings: " + json.dumps(s.settings, sort_keys=True),
                 "provenance: " + json.dumps(s.provenance, sort_keys=True)]
        ok = v["status"] == "ok"
        for part in ("train", "val", "test"):
            sel = v["part"] == part
            if sel.any():
                per = Counter(v["class_name"][sel & ok])
                clips = v["n_clips"][sel & ok]
                lines.append(f"{part:5s}: {len(per)} classes, {int((sel & ok).sum())} videos ok, "
                             f"{int((sel & ~ok).sum())} failed; clips per video {clips.min() if len(clips) else 0}-"
                             f"{clips.max() if len(clips) else 0}; per class "
                             + ", ".join(f"{c} {n}" for c, n in sorted(per.items())))
        fails = s.failures()
        if fails:
            lines.append(f"{len(fails)} failed video(s):")
            lines += [f"  {vid}: {why}" for vid, why in fails]
        lines.append(f"views per video: {int(np.max(v['n_views']))}")
    return "\n".join(lines)


def describe_checkpoint(path: Path) -> str:
    ck = torch.load(path, weights_only=False, map_location="cpu")
    if not isinstance(ck, dict) or "head" not in ck:
        raise ValueError(f"{path} is not a checkpoint written by `pipeline train`")
    cfg = ck["train_config"]
    n_params = sum(t.numel() for t in ck["state_dict"].values())
    return "\n".join([
        f"checkpoint {path}: head {ck['head']} {ck['head_config']} ({n_params} parameter values), loss {cfg['loss']}",
        f"best validation accuracy {100 * ck.get('best_val', float('nan')):.2f}% at episode {ck.get('episode')}",
        "training: " + json.dumps(cfg, sort_keys=True),
        f"trained on cache {ck['cache']['path']} (settings hash {ck['cache']['settings_hash']})",
        "cache settings: " + json.dumps(ck["cache"]["settings"], sort_keys=True),
    ])
