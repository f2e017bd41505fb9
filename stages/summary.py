"""What `make demo` prints after `dvc repro`: the results table, the report, the predictions."""
from __future__ import annotations

import json
from pathlib import Path


def main() -> None:
    print("\nResults (reports/results.md):\n")
    print(Path("reports/results.md").read_text())
    pred = Path("predictions/demo.json")
    if pred.exists():
        out = json.loads(pred.read_text())
        print(f"pipeline predict with {out['k_shot']} examples per test class ({out['checkpoint']}):")
        print(f"{'query':34s} {'true class':18s} {'predicted':18s} margin")
        for r in out["results"]:
            print(f"{Path(r['query']).name:34s} {r['true']:18s} {r.get('predicted', '(unreadable)'):18s} "
                  f"{r.get('margin', float('nan')):.3f}")
        print(f"{out['correct']}/{len(out['results'])} correct\n")
    figures = sorted(p.name for p in Path("reports").glob("*.png"))
    print(f"Report with its figures ({', '.join(figures)}): {Path('reports/index.md').resolve()}")


if __name__ == "__main__":
    main()
