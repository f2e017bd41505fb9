"""`pipeline report`: the paper's tables and figures from evaluated runs.

Reads `<runs>/<name>/seed-N/` folders (best.pt, curve.csv) and `<metrics>/<name>.json` (+ `.npy` per-episode
accuracies written by `pipeline eval --accuracies`) and writes, under `--out`:
  results.md / results.csv   Table 4 style: mean +- 95% CI per run, paired comparison to the best
                             run with the same K on the same episodes
  similarity.png             Fig. 8: 5 support classes x 75 queries of one fixed test episode,
                             from each run's head scores, and the ground truth
  tsne.png                   Fig. 6: t-SNE of each head's per-video encodings, coloured by class
  sweep_gamma.png, sweep_margin.png   Fig. 7, when runs differ only in gamma (or m), >= 3 values
  curves.png                 learning curves: training loss and validation accuracy vs episodes
  index.md                   what was written, with the table inline
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MissingFile
from ..fewshot.evaluate import check_scores, compare_to_best, dropped_note, missing_note, run_checkpoints, table
from ..fewshot.heads import format_options

SWEPT = ("gamma", "margin")


def load_runs(metrics_dir: Path) -> tuple[list[dict], list]:
    """The metrics JSON of every evaluated run, and its (seeds, E) per-episode accuracies (.npy beside
    it) or None; comparisons with the best run are recomputed across all of them."""
    runs, accs = [], []
    for f in sorted(Path(metrics_dir).glob("*.json")):
        m = json.loads(f.read_text())
        if "per_seed" not in m:
            if "accuracy" in m:
                raise MissingFile(f"{f} was written before runs had training seeds; run `pipeline eval` on the "
                                  "run again (or `dvc repro`) to rewrite it")
            continue
        npy = f.with_suffix(".npy")
        runs.append(m)
        accs.append(np.atleast_2d(np.load(npy)) if npy.exists() else None)
    compare_to_best(runs, accs)
    return runs, accs


def csv_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        vs = r["vs_best"] or {}
        rows.append(dict(run=r["run"], head=r["head"], loss=r["loss"],
                         options=format_options(r.get("head_options", {})),
                         setting=f"{r['n_way']}-way {r['k_shot']}-shot", accuracy=round(100 * r["accuracy"], 2),
                         ci95=round(100 * r["ci95"], 2), seeds=r["seeds"], seed_min=round(100 * r["seed_min"], 2),
                         seed_max=round(100 * r["seed_max"], 2), seed_std=round(100 * r["seed_std"], 2),
                         episodes=r["episodes"], noise=r["noise"],
                         vs_best="best" if not vs else vs.get("best"),
                         diff=round(100 * vs["diff"], 2) if vs.get("diff") is not None else "",
                         p_value=vs.get("p_value", "")))
    return rows


def encode_test_videos(runs, runs_dir, cache):
    """Per run with a checkpoint: its head and every test video's encoding, computed once and shared
    by the similarity figure and the t-SNE; and the test features each kind of input."""
    from ..fewshot import checkpoint
    from ..fewshot.evaluate import encode_all
    from ..fewshot.features import load
    from ..store import FeatureStore
    encoded, feats = [], {}
    with FeatureStore(cache) as st:
        for r in runs:
            folder = Path(runs_dir) / r["run"]
            if not folder.is_dir():
                continue
            head = checkpoint.load(run_checkpoints(folder)[0]).build_head()     # the first seed's
            if head.view not in feats:
                feats[head.view] = load(st, "test", head.view, views=1,
                                        drop_nonfinite=any(r.get("dropped") for r in runs))
            f = feats[head.view]
            x = torch.from_numpy(np.asarray(f.inputs(np.arange(len(f.ids)), clips=head.clips), np.float32))
            encoded.append((r, head, encode_all(head, x)))
    return feats, encoded


def panel_grid(plt, count: int, width: float, height: float):
    """A figure of `count` panels: one column up to four, else a grid of two or three columns; the
    layout engine keeps the title, labels and colour bars apart. Returns the figure and its axes in
    reading order (spare axes hidden)."""
    cols = 1 if count <= 4 else 2 if count <= 8 else 3
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.8), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def similarity_figure(path, feats, encoded, cache, plt):
    """Fig. 8: each head's scores of the queries of one fixed test episode against its classes
    (for embedding heads, the cosine to the support video), and the ground truth; rows are the
    support classes by name, queries are grouped by their class."""
    from ..fewshot.episodes import fixed_episodes
    r0 = encoded[0][0]
    ref = next(iter(feats.values()))
    ep = fixed_episodes(Path(cache), ref.ids, ref.by_class(), "test", r0["n_way"], 1, r0["q_query"],
                        r0["episodes"], r0["seed"])[0]
    n, kq = ep.shape
    names = [str(ref.classes[i]) for i in ep[:, 0]]                      # the support classes, in order
    panels = []
    with torch.no_grad():
        for r, head, z in encoded:
            scores = head.scores(z[ep[:, :1]], head.as_query(z[ep[:, 1:].reshape(-1)]))   # (N*Q, N), 1-shot
            check_scores(scores[None], lambda _: f"the first test episode ({r['run']})")
            panels.append((f"{r['run']} ({r['head']}, {r['loss']})", scores.T.numpy()))
    panels.append(("ground truth", np.kron(np.eye(n), np.ones((1, kq - 1)))))
    fig, axes = panel_grid(plt, len(panels), 7.5, 0.28 * n + 1.1)
    for i, (ax, (title, sim)) in enumerate(zip(axes, panels)):
        # each panel its own range: raw cosines of frozen features differ in the second decimal,
        # distances (otam, trx) are negative; a shared range would show them flat
        im = ax.imshow(sim, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_yticks(range(n), names, fontsize=7)
        ax.set_xticks([(c + 0.5) * (kq - 1) - 0.5 for c in range(n)], names, fontsize=7)
        for c in range(1, n):
            ax.axvline(c * (kq - 1) - 0.5, color="white", lw=0.6)
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    fig.supxlabel(f"queries, {kq - 1} per class, grouped by their class", fontsize=9)
    fig.supylabel("support class", fontsize=9)
    fig.suptitle(f"Scores of the queries against the support classes, first fixed test episode "
                 f"({n}-way 1-shot); colours scaled per panel", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tsne_figure(path, feats, encoded, plt):
    """Fig. 6: t-SNE of each head's per-video encoding (the video vector of embedding heads) of the
    test videos, unit-normalised, one panel per run, one legend of class names for all."""
    from sklearn.manifold import TSNE
    classes_of = next(iter(feats.values())).classes
    classes = sorted(set(classes_of))
    fig, axes = panel_grid(plt, len(encoded), 4.2, 3.6)
    for ax, (r, _, z) in zip(axes, encoded):
        v = F.normalize(z.flatten(1), dim=-1).numpy()
        xy = TSNE(2, perplexity=min(30, len(v) - 1), init="pca", random_state=0).fit_transform(v)
        for c in classes:
            m = classes_of == c
            ax.scatter(xy[m, 0], xy[m, 1], s=8, label=c)
        ax.set_title(f"{r['run']} ({r['head']}, {r['loss']})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(6, len(classes)),
               fontsize=8, markerscale=1.5)
    fig.suptitle("t-SNE of the test videos' encodings, coloured by class", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_figures(out: Path, runs, plt) -> list[Path]:
    """Fig. 7: accuracy vs gamma / m, for runs identical but for that value (>= 3 values)."""
    written = []
    for key in SWEPT:
        groups = {}
        for r in runs:
            cfg = dict(r.get("train_config", {}))
            if r["loss"] != "circle" or key not in cfg:
                continue
            value = cfg.pop(key)
            rest = json.dumps({k: v for k, v in cfg.items() if k != "seed"} | {"k": r["k_shot"]}, sort_keys=True)
            if value not in [x for x, _ in groups.get(rest, [])]:  # a repeated setting counts once
                groups.setdefault(rest, []).append((value, r))
        groups = {k: sorted(v, key=lambda t: t[0]) for k, v in groups.items() if len(v) >= 3}
        if not groups:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for rest, pts in groups.items():
            cfg = json.loads(rest)
            ax.errorbar([p for p, _ in pts], [100 * r["accuracy"] for _, r in pts],
                        yerr=[100 * r["ci95"] for _, r in pts], marker="o", capsize=3,
                        label=f"{cfg.get('head')} {cfg.get('k')}-shot")
        if key == "gamma":
            ax.set_xscale("log", base=2)
        ax.set_xlabel("scale factor gamma" if key == "gamma" else "relaxation margin m")
        ax.set_ylabel("accuracy (%) with 95% CI")
        ax.set_title(f"Circle loss: accuracy vs {'gamma' if key == 'gamma' else 'm'}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"sweep_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def curves_figure(path, runs_dir, plt):
    """Learning curves, one line per run: the mean over its training seeds, the band their range."""
    curves = {}
    for f in sorted(Path(runs_dir).glob("*/seed-*/curve.csv")):
        with open(f) as fh:
            rows = list(csv.DictReader(fh))
        if len(rows) > 1:
            curves.setdefault(f.parent.parent.name, []).append(rows)
    if not curves:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    for name, seeds in curves.items():
        n = min(len(rows) for rows in seeds)            # seeds of one run share the validation schedule
        ep = [int(r["episode"]) for r in seeds[0][:n]]
        for ax, key, scale in ((a, "loss", 1), (b, "val_accuracy", 100)):
            v = np.array([[scale * float(r[key]) for r in rows[:n]] for rows in seeds])
            line, = ax.plot(ep, v.mean(0), marker=".", label=f"{name} ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
            if len(seeds) > 1:
                ax.fill_between(ep, v.min(0), v.max(0), color=line.get_color(), alpha=0.15)
    a.set_xlabel("training episode")
    a.set_ylabel("training loss (mean since last validation)")
    a.set_yscale("log")
    b.set_xlabel("training episode")
    b.set_ylabel("validation accuracy (%)")
    a.set_title("Training loss (each run's own loss)", fontsize=10)
    b.set_title("Validation accuracy (fixed episodes)", fontsize=10)
    fig.legend(*b.get_legend_handles_labels(), loc="outside right center", fontsize=8)
    fig.suptitle("Learning curves: mean over training seeds, band = their range", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(metrics_dir, runs_dir, cache, out) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs, _ = load_runs(metrics_dir)
    if not runs:
        raise MissingFile(f"no metrics JSON in {metrics_dir} (run `pipeline eval --metrics ...`)")
    rows, md = csv_rows(runs), table(runs)
    notes = "".join(f"\n{n}\n" for n in (missing_note(runs), dropped_note(runs)) if n)
    (out / "results.md").write_text(md + "\n" + notes)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    figures = []
    if cache and Path(cache).exists():
        feats, encoded = encode_test_videos(runs, runs_dir, cache)
        if encoded:
            figures += [similarity_figure(out / "similarity.png", feats, encoded, cache, plt),
                        tsne_figure(out / "tsne.png", feats, encoded, plt)]
    figures += sweep_figures(out, runs, plt)
    figures.append(curves_figure(out / "curves.png", runs_dir, plt))
    figures = [f for f in figures if f]
    index = ["# Report", "", "## Results (mean over training seeds, 95% CI of the noise named in the last column; "
             "all runs on the same fixed test episodes)", "", md, "",
             "Also as [results.csv](results.csv).", "", "## Figures", ""]
    index += [f"- [{f.name}]({f.name})" for f in figures]
    (out / "index.md").write_text("\n".join(index) + "\n")
    return [out / "results.md", out / "results.csv", *figures, out / "index.md"]
