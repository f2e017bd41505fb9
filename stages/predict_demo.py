"""DVC stage predict_demo: recognise held-out videos of the demo's test classes from K examples per class.

Support = the last K videos of each test class (symlinked into one folder per class), queries = the
first videos of each class; writes the predictions as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pipeline.files import atomic_write_text
from pipeline.tools.predict import predict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=Path("data/demo"))
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--k-shot", type=int, default=5)
    ap.add_argument("--queries-per-class", type=int, default=2)
    a = ap.parse_args()
    support = a.data.with_name(a.data.name + "_predict") / "support"
    queries = []
    for c in (a.data / "splits" / "test_classes.txt").read_text().split():
        files = sorted((a.data / c).glob("*.avi"))
        (support / c).mkdir(parents=True, exist_ok=True)
        for f in files[-a.k_shot:]:
            link = support / c / f.name
            if not link.exists():
                os.symlink(os.path.relpath(f, link.parent), link)
        queries += files[:a.queries_per_class]
    out = predict(a.checkpoint, support, queries)
    for r in out["results"]:
        r["true"] = Path(r["query"]).parent.name
    out["k_shot"] = a.k_shot
    out["correct"] = sum(r.get("predicted") == r["true"] for r in out["results"])
    # how much of the embedding cache was warm depends on earlier runs: printed, not tracked by DVC
    history = {k: out.pop(k) for k in ("decoded", "reused_support")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, json.dumps(out, indent=1))
    print(f"{out['correct']}/{len(out['results'])} held-out videos right; predictions in {a.out} "
          f"({history['decoded']} videos decoded, {history['reused_support']} support embeddings reused)")


if __name__ == "__main__":
    main()
