"""`pipeline info`: what a cache or a checkpoint holds, in a few readable lines."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import MissingFile
from ..fewshot import checkpoint
from ..store import FeatureStore


def describe(path) -> str:
    path = Path(path)
    if not path.exists():
        raise MissingFile(f"{path} does not exist")
    if path.suffix in (".h5", ".hdf5"):
        return describe_cache(path)
    return checkpoint.describe(path, checkpoint.load(path))


def describe_cache(path: Path) -> str:
    with FeatureStore(path) as s:
        v = s.videos
        pooled = s.f["pooled"]
        if s.imported:
            what = (f"imported clip vectors ({pooled.shape[1]}-d, from {s.settings.get('source')}), checksummed; no maps, "
                    f"no per-step view; format {s.version}")
        else:
            feats = s.f["features"]
            comp = s.settings.get("compression", feats.compression or "none")       # the recorded filter's name
            what = (f"features {feats.shape[1:]} {feats.dtype}, compression {comp}, "
                    + ("checksummed" if feats.fletcher32 else "no checksums on the maps (written before 2026-12-07)")
                    + f"; format {s.version}, " + ("per-step view " + str(s.f["steps"].shape[1:]) if "steps" in s.f
                                                  else f"no per-step view (`pipeline upgrade {path}` adds it)"))
        lines = [f"cache {path}: {path.stat().st_size / 1e6:.1f} MB, {len(s)} videos, {pooled.shape[0]} clip rows", what,
                 "settings: " + json.dumps(s.settings, sort_keys=True),
                 "provenance: " + json.dumps({k: v for k, v in s.provenance.items() if k not in ("missing", "duplicates")},
                                             sort_keys=True)]
        dups = s.provenance.get("duplicates") or []
        if dups:
            lines.append(f"byte-identical files (same sha256): {len(dups)} group(s): "
                         + "; ".join(" = ".join(g) for g in dups[:5]) + ("; ..." if len(dups) > 5 else ""))
        missing = s.provenance.get("missing") or {}
        if any(missing.values()):
            lines.append(f"listed by the split but missing from the dataset: {sum(map(len, missing.values()))} "
                         f"videos (" + ", ".join(f"{p} {len(v)}" for p, v in missing.items()) + ")")
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
        warned = np.flatnonzero(v["warning"] != "")
        if len(warned):
            lines.append(f"{len(warned)} video(s) used with a warning:")
            lines += [f"  {v['id'][i]}: {v['warning'][i]}" for i in warned]
        fails = s.failures()
        if fails:
            lines.append(f"{len(fails)} failed video(s):")
            lines += [f"  {vid}: {why}" for vid, why in fails]
        lines.append(f"views per video: {int(np.max(v['n_views']))}")
        digest = s.f.attrs.get("content_digest")
        lines.append(f"content digest {digest[:16]}... (`--verify` checks every stored value against the digests)"
                     if digest else "no digests (written before they were recorded): cannot be verified")
    return "\n".join(lines)
