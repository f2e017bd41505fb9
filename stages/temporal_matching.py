"""The matching study's table, reproduced (studies/temporal_matching/dvc.yaml):

    python -m stages.temporal_matching train --params P --head H --shot K   # one head, one shot, seeds 1, 5, 10
    python -m stages.temporal_matching report --params P                    # theirs beside ours

Head definitions and their published numbers: configs/temporal_matching.yaml; which dataset, files
and training length: the study's params.yaml.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

from pipeline.errors import ConfigError

PRESET = Path("configs/temporal_matching.yaml")


def load(params: Path) -> tuple[dict, dict]:
    p, preset = yaml.safe_load(params.read_text()), yaml.safe_load(PRESET.read_text())
    for k in ("dataset", "cache", "out", "heads", "shots", "training"):
        if k not in p:
            raise ConfigError(f"{params}: missing key {k}")
    if p["dataset"] not in preset["published"]:
        raise ConfigError(f"{params}: dataset {p['dataset']!r} is not one of theirs "
                          f"({', '.join(k for k in preset['published'] if k != 'source')})")
    unknown = [h for h in p["heads"] if h not in preset["heads"]]
    if unknown:
        raise ConfigError(f"{params}: heads {unknown} are not defined in {PRESET} (known: {', '.join(preset['heads'])})")
    return p, preset


def run_name(head: str, shot: int) -> str:
    return f"{head}_{shot}shot"


def train(params: Path, head: str, shot: int) -> None:
    from pipeline.fewshot.train import TrainConfig, train as run_train
    p, preset = load(params)
    cfg = TrainConfig.from_mapping(dict(p["training"], **preset["heads"][head], k_shot=shot),
                                   f"{params}: training + {PRESET}: heads.{head}")
    for r in run_train(p["cache"], Path(p["out"]) / "runs" / run_name(head, shot), cfg, overwrite=True):
        print(f"{r['folder']}: best validation accuracy {100 * r['best_val']:.2f}% at episode {r['best_episode']} of "
              f"{r['episodes']}")


def side_by_side(p: dict, preset: dict, metrics: Path) -> str:
    """Their table beside ours: per cell both numbers (mean +- std over seeds), the difference, and
    whether it lies within both std's plus our episode interval."""
    theirs = preset["published"][p["dataset"]]
    found = {f.stem: json.loads(f.read_text()) for f in sorted(metrics.glob("*.json"))}    # run name -> metrics
    counts = sorted({m["episodes"] * m["runs"] for m in found.values()})
    lines = [f"# The matching study on {p['dataset']}: theirs beside ours", "",
             f"Theirs: {preset['published']['source']}.",
             f"Ours: this toolkit on the cache {p['cache']} (backbone {p['backbone']}), the same heads trained with "
             f"seeds {', '.join(map(str, p['training'].get('seed_list', [])))}, scored on "
             f"{' or '.join(f'{c:,}' for c in counts) or 'none'} of their saved episodes per shot; mean +- std over "
             "seeds (ddof 0, as theirs) and the 95% interval of our episodes. 'within' when |ours - theirs| <= their "
             "std + our std + our episode interval: a difference that the seeds and the episodes can explain.", "",
             "| head | shots | theirs | ours | ours - theirs | within |", "|---|---|---|---|---|---|"]
    for head in p["heads"]:
        for shot in p["shots"]:
            pub = theirs.get(head, {}).get(shot)
            m = found.get(run_name(head, shot))
            if m is None:
                lines.append(f"| {head} | {shot} | {pub[0]:.1f} ± {pub[1]:.1f} | (not run) | | |" if pub else
                             f"| {head} | {shot} | (not published) | (not run) | | |")
                continue
            seeds = [100 * s for s in m["seed_means"]]
            mean = sum(seeds) / len(seeds)
            std = math.sqrt(sum((s - mean) ** 2 for s in seeds) / len(seeds))
            ci = 100 * m["episode_ci95"]
            ours = f"{mean:.1f} ± {std:.1f} (episodes ± {ci:.1f})"
            if pub is None:
                lines.append(f"| {head} | {shot} | (not published) | {ours} | | |")
                continue
            diff = mean - pub[0]
            within = "yes" if abs(diff) <= pub[1] + std + ci else "no"
            lines.append(f"| {head} | {shot} | {pub[0]:.1f} ± {pub[1]:.1f} | {ours} | {diff:+.1f} | {within} |")
    return "\n".join(lines) + "\n"


def report(params: Path, out: Path | None) -> None:
    from pipeline.files import atomic_write_text
    p, preset = load(params)
    text = side_by_side(p, preset, Path(p["out"]) / "metrics")
    atomic_write_text(out or Path(p["out"]) / "report.md", text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--params", type=Path, required=True)
    t.add_argument("--head", required=True)
    t.add_argument("--shot", type=int, required=True)
    r = sub.add_parser("report")
    r.add_argument("--params", type=Path, required=True)
    r.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.cmd == "train":
        train(a.params, a.head, a.shot)
    else:
        report(a.params, a.out)


if __name__ == "__main__":
    main()
