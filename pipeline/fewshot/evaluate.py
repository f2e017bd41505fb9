"""The paper's test protocol: fixed episodes (default 5-way, 15 queries, 600 x 10 runs), mean
accuracy with a 95% confidence interval, computed from per-video work done once."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..device import pick_device
from ..errors import ConfigError, MissingFile, PipelineError
from ..files import atomic_path, atomic_write_text, check_output
from ..store import FeatureStore, check_settings
from . import checkpoint
from .heads import changed_options, format_options
from .episodes import episodes_digest, fixed_episodes, load_sequences, sequences_digest
from .features import SplitFeatures, load
from .metrics import format_p, mean_ci, over_seeds, paired, summarize

ENCODE_BLOCK = 4096   # videos encoded per call: memory stays bounded for map heads


class ScoreError(PipelineError):
    pass


@torch.no_grad()
def encode_all(head, x: torch.Tensor) -> torch.Tensor:
    """Every video's encoding (videos, ...), computed once."""
    return torch.cat([head.encode(x[i:i + ENCODE_BLOCK]) for i in range(0, len(x), ENCODE_BLOCK)])


GATHER_BUDGET = 2 ** 28        # bytes of encodings gathered per scoring call
ENCODINGS_BUDGET = 2 ** 30     # bytes of encodings held per block of imported episodes


@torch.no_grad()
def episode_accuracies(head, feats, episodes: np.ndarray, k_shot: int, chunk: int = 500,
                       device: torch.device | str = "cpu") -> np.ndarray:
    """(E,) accuracy of every episode (E, N, K+Q): each video is encoded once, then every episode
    is scored from the encodings, `chunk` episodes per call for heads whose scores take a batch;
    on `device`, where the head must be."""
    e, n, kq = episodes.shape
    x = np.asarray(feats.inputs(np.arange(len(feats.ids)), clips=head.clips), np.float32)
    z = encode_all(head, torch.from_numpy(x).to(device))
    zq = head.as_query(z)
    target = torch.arange(n, device=device).repeat_interleave(kq - k_shot)
    # episodes per call: `chunk`, fewer when the gathered encodings would pass GATHER_BUDGET (Chamfer++
    # at T = 8 keeps 56 x 1152 values a video: 500 episodes would gather 10 GB)
    per_episode = n * kq * z[:1].numel() * z.element_size()
    step = max(1, min(chunk, GATHER_BUDGET // per_episode)) if head.batched else 1
    acc = []
    for s in range(0, e, step):
        ep = torch.from_numpy(episodes[s:s + step]).to(device)
        support, queries = z[ep[:, :, :k_shot]], zq[ep[:, :, k_shot:].flatten(1, 2)]    # (b, N, K, ...), (b, N*Q, ...)
        scores = head.scores(support, queries) if head.batched else head.scores(support[0], queries[0])[None]
        check_scores(scores, lambda i: f"episode {s + i} of {e}")
        acc.append((scores.argmax(-1) == target).float().mean(-1))                  # scores (b, N*Q, N)
    return torch.cat(acc).cpu().numpy()


def sequence_accuracies(head, feats: SplitFeatures, members: np.ndarray, positions: np.ndarray, k_shot: int,
                        block: int = 1000, device: torch.device | str = "cpu") -> np.ndarray:
    """(E,) accuracy of episodes whose members are fixed clip sequences (imported saved episodes):
    `members` (E, N, K+Q) video indices into `feats`, `positions` (E, N, K+Q, T) their clips. Each
    member is encoded as it occurs (a video sampled at other clips is another sequence), `block`
    episodes at a time, fewer when their encodings would pass ENCODINGS_BUDGET (TRX keeps its tuples'
    keys and values: 1,000 5-shot episodes would hold 30,000 of them)."""
    if head.clips not in (None, positions.shape[-1]):
        raise ConfigError(f"the episodes hold sequences of {positions.shape[-1]} clips; this head reads "
                          f"{head.clips} (--head-opt clips={positions.shape[-1]} when training)")
    one = encode_all(head, torch.from_numpy(feats.x[feats.first[members[:1, 0, 0], 0][:, None] + positions[0, 0, :1]])
                     .float().to(device))                                          # one member's encoding
    block = max(1, min(block, ENCODINGS_BUDGET // (members[0].size * one.numel() * one.element_size())))
    acc = []
    for s in range(0, len(members), block):
        m, p = members[s:s + block], positions[s:s + block]
        rows = feats.first[m.ravel(), 0][:, None] + p.reshape(-1, p.shape[-1])         # (B*N*(K+Q), T)
        seqs = feats.x[rows][:, None]                                                     # (items, 1, T, D)
        local = SplitFeatures.from_sequences(feats.ids[m.ravel()], feats.classes[m.ravel()], seqs)
        acc.append(episode_accuracies(head, local, np.arange(m.size).reshape(m.shape), k_shot, device=device))
    return np.concatenate(acc)


def check_scores(scores: torch.Tensor, where) -> None:
    """Scores (b, ...) from a head: a NaN would become an accuracy (argmax picks class 0), so it is an
    error naming where (`where(i)` describes batch item i)."""
    bad = ~torch.isfinite(scores).flatten(1).all(1)
    if bad.any():
        raise ScoreError(f"the head gave non-finite scores for {where(int(bad.nonzero()[0]))}"
                        f"{f' and {int(bad.sum()) - 1} more' if bad.sum() > 1 else ''}: the features are finite, so "
                        "the head's computation is at fault (its weights, or a division by zero)")


def check_cache(ck, store: FeatureStore, path) -> None:
    check_settings(ck.cache["settings"], store.settings, f"{path} (its training cache)",
                   f"evaluate it on a cache extracted with the same settings as {ck.cache['path']}")


def run_checkpoints(target) -> list[Path]:
    """A run folder's selected checkpoints, one per training seed (seed-*/best.pt, in seed order), or
    a single checkpoint file."""
    target = Path(target)
    if not target.is_dir():
        return [target]
    found = sorted(target.glob("seed-*/best.pt"), key=lambda p: int(p.parent.name.split("-", 1)[1]))
    if not found:
        raise MissingFile(f"{target}: no seed-*/best.pt in this run folder (run `pipeline train --out {target}`)")
    return found


def run_name(target) -> str:
    """What a result is called (its row and its metrics file): x for a run folder runs/x; a single
    checkpoint adds where it sits in the run, so that best.pt and last.pt of one seed keep apart:
    x.seed-0.best for runs/x/seed-0/best.pt, x.last for runs/x/last.pt."""
    t = Path(target)
    if t.is_dir():
        return t.name
    if t.parent.name.startswith("seed-"):
        return f"{t.parent.parent.name}.{t.parent.name}.{t.stem}"
    return f"{t.parent.name}.{t.stem}"


def evaluate(targets, cache, n_way=5, k_shot=None, q_query=15, episodes=600, runs=10, seed=0,
             part="test", device: str = "cpu", drop_nonfinite: bool = False,
             episodes_file=None) -> tuple[list[dict], list[np.ndarray]]:
    """Metrics of each target (a run folder: every seed's best.pt; or one checkpoint) on the same fixed
    episodes, compared with the best target on the same episodes and seeds; and each target's
    (seeds, E) per-episode accuracies. K defaults to the K the checkpoints were trained with (which
    must then agree). Each seed's last.pt, when present, is scored too, so that the effect of
    selecting on validation is visible. With `drop_nonfinite`, test videos whose features hold a NaN or
    infinity are left out (and listed in each result's `dropped`) instead of stopping."""
    if part not in ("test", "val"):
        raise ConfigError(f"--part must be test or val, got {part!r} (training classes are not a test)")
    paths = [run_checkpoints(t) for t in targets]
    cks = {p: checkpoint.load(p) for ps in paths for p in ps}
    if k_shot is None and not episodes_file:
        trained = {ck.train_config["k_shot"] for ck in cks.values()}
        if len(trained) > 1:
            raise ConfigError(f"the checkpoints were trained with K = {sorted(trained)}; pass --k-shot to score them "
                              "on the same episodes")
        k_shot = trained.pop()
    built = {p: ck.build_head() for p, ck in cks.items()}
    with FeatureStore(cache) as store:
        for p, ck in cks.items():
            check_cache(ck, store, p)
        feats = {c: load(store, part, c, views=1, drop_nonfinite=drop_nonfinite) for c in {h.view for h in built.values()}}
        any_feats = next(iter(feats.values()))
        dropped = sorted({i for f in feats.values() for i in f.dropped})
        if episodes_file:
            asked = k_shot
            eps, positions, n_way, k_shot, q_query, episodes, runs = _sequences(
                episodes_file, any_feats, part, runs, store.f.attrs.get("content_digest", ""))
            if asked not in (None, k_shot):
                raise ConfigError(f"--k-shot {asked}: {episodes_file} holds {k_shot}-shot episodes (N, K and Q are "
                                  "the file's)")
            digest = sequences_digest(any_feats.ids, eps, positions)
        else:
            eps = fixed_episodes(Path(cache), any_feats.ids, any_feats.by_class(), part, n_way, k_shot, q_query,
                                 episodes * runs, seed)
            positions, digest = None, episodes_digest(any_feats.ids, eps)
        settings_hash = store.settings_hash
        missing = _missing(store.provenance, part)

    dev = pick_device(device)
    scored = {}

    def score(ck, head=None):
        """Accuracies of a checkpoint's head; a head identical to one already scored (a parameter-free
        head's seeds, a best.pt equal to its last.pt) is not scored again."""
        key = _identity(ck)
        if key not in scored:
            head = (head or ck.build_head()).to(dev)
            scored[key] = (sequence_accuracies(head, feats[head.view], eps, positions, k_shot, device=dev)
                           if episodes_file else episode_accuracies(head, feats[head.view], eps, k_shot, device=dev))
        return scored[key]

    results, accs = [], []
    for target, ps in zip(targets, paths):
        acc = np.stack([score(cks[p], built[p]) for p in ps])                # (seeds, E)
        per_seed = [_seed_record(p, cks[p], a, score) for p, a in zip(ps, acc)]
        first = cks[ps[0]]
        m = over_seeds(acc)
        m.update(summarize_runs(acc.mean(0), runs))
        m.update(run=run_name(target), head=first.head,
                 head_options=first.head_options, loss=first.train_config["loss"] if first.state_dict else "(none)",
                 per_seed=per_seed, cache=str(cache), cache_settings_hash=settings_hash, n_way=n_way, k_shot=k_shot,
                 q_query=q_query, part=part, seed=seed, episodes_digest=digest, train_config=first.train_config,
                 episodes_file=str(episodes_file) if episodes_file else None,
                 missing=missing, dropped=dropped)
        results.append(m)
        accs.append(acc)
    compare_to_best(results, accs)
    return results, accs


def _sequences(path, feats: SplitFeatures, part: str, runs: int, content: str):
    """An imported episode file for `feats` of a cache whose content digest is `content`: (episodes
    as indices into feats, positions, N, K, Q, episodes per run, runs)."""
    ids, eps, positions, meta = load_sequences(path)
    if meta.get("cache_content") != content:
        raise ConfigError(f"{path} was imported against a cache of other contents (its features were checked "
                          "against those, not these): import the episodes again for this cache")
    if meta.get("part") != part:
        raise ConfigError(f"{path} holds {meta.get('part')} episodes; evaluate with --part {meta.get('part')}")
    index = {v: i for i, v in enumerate(feats.ids)}
    absent = [v for v in ids if v not in index]
    if absent:
        raise ConfigError(f"{path} names {len(absent)} video(s) not among this cache's usable {part} videos (e.g. "
                          f"{absent[0]}): it was imported for another cache")
    if feats.first is None:
        raise ConfigError(f"{path} holds clip sequences: score it with a head that reads pooled clip vectors")
    members = np.array([index[v] for v in ids])[eps]                      # (E, N, K+Q) indices into feats
    if (positions >= feats.count[members][..., None]).any():
        raise ConfigError(f"{path} names clips beyond the end of their videos in this cache: it was imported for "
                          "another cache")
    count = len(eps)
    if count % runs:
        raise ConfigError(f"--runs {runs} does not divide the {count} episodes of {path}")
    return members, positions, int(meta["n_way"]), int(meta["k_shot"]), int(meta["q_query"]), count // runs, runs


def _missing(provenance: dict, part: str) -> dict:
    """What the cache's split listed but the dataset lacked (`extract --allow-missing`), for this part."""
    missing = provenance.get("missing") or {}
    gone = missing.get(part, [])
    classes = sorted({v.rsplit("/", 1)[0] for v in gone})
    total = sum(map(len, missing.values()))
    return dict(videos=len(gone), classes=classes, all_parts=total)


def missing_note(results: list[dict]) -> str:
    """A line under a table when the cache lacks listed videos: numbers then differ from the split's."""
    m = results[0].get("missing") if results else None
    if not m or not m["all_parts"]:
        return ""
    return (f"Missing from the dataset (extracted with --allow-missing): {m['videos']} listed {results[0]['part']} "
            f"video(s) in {len(m['classes'])} class(es) ({', '.join(m['classes'][:5])}"
            f"{', ...' if len(m['classes']) > 5 else ''}), {m['all_parts']} in all parts: compare with published "
            "numbers on the full split with care.")


def dropped_note(results: list[dict]) -> str:
    """Lines under a table for the results whose episodes `--drop-nonfinite` drew without some videos."""
    return "\n".join(f"{r['run']}: {len(r['dropped'])} {r['part']} video(s) left out for non-finite features "
                     f"(--drop-nonfinite: {', '.join(r['dropped'][:5])}{', ...' if len(r['dropped']) > 5 else ''}); "
                     "its episodes were drawn without them" for r in results if r.get("dropped"))


def summarize_runs(acc: np.ndarray, runs: int) -> dict:
    """The paper's runs (600 episodes each) of the seed-averaged accuracies."""
    s = summarize(acc, runs)
    return {k: s[k] for k in ("episodes", "runs", "run_means", "run_std", "run_min", "run_max")}


def _seed_record(path: Path, ck, acc: np.ndarray, score) -> dict:
    """One seed: the evaluated checkpoint's validation and test accuracy, and its last checkpoint's."""
    rec = dict(seed=ck.train_config["seed"], checkpoint=str(path), episode=ck.episode, val=_own_val(ck),
               test=float(acc.mean()), episode_ci95=mean_ci(acc)[1])
    last = path.with_name("last.pt")
    if last.exists() and last != path:
        lk = checkpoint.load(last)
        rec.update(last_episode=lk.episode, last_val=_own_val(lk), last_test=float(score(lk).mean()))
    return rec


def _own_val(ck) -> float:
    """A checkpoint's own validation accuracy: last.pt records the best so far as best_val, and its
    own in the last point of its curve."""
    curve = (ck.resume or {}).get("curve") or []
    return curve[-1]["val_accuracy"] if curve else ck.best_val


def _identity(ck) -> str:
    """What determines a checkpoint's scores: its head, options, head file and weights."""
    h = hashlib.sha256(json.dumps([ck.head, ck.head_options, ck.head_file], sort_keys=True, default=str).encode())
    for name, t in sorted(ck.state_dict.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def compare_to_best(results: list[dict], accs: list[np.ndarray]) -> None:
    """Sets each result's `vs_best`: the paired comparison with the most accurate result scored on the
    same episodes (same part, N, K, Q, count, episode seed), over the training seeds both have."""
    def key(r):
        return (r["part"], r["n_way"], r["k_shot"], r["q_query"], r["episodes"], r["seed"])

    for r, a in zip(results, accs):
        group = [(o, b) for o, b in zip(results, accs) if key(o) == key(r)]
        best, best_acc = max(group, key=lambda t: t[0]["accuracy"])
        if best is r:
            r["vs_best"] = None
            continue
        mine, theirs = r.get("episodes_digest"), best.get("episodes_digest")
        if mine is None or theirs is None or mine != theirs:
            # same protocol, other episodes (another cache's videos, or an older file): not a pair
            why = ("episodes not recorded (metrics of an earlier version: run `pipeline eval` again)"
                   if mine is None or theirs is None else f"scored on other episodes ({mine} vs {theirs})")
            r["vs_best"] = dict(best=best["run"], diff=None, why=why)
            continue
        if a is None or best_acc is None:
            r["vs_best"] = dict(best=best["run"], diff=None, why="no per-episode accuracies saved")
            continue
        mine = {s["seed"]: i for i, s in enumerate(r["per_seed"])}
        theirs = {s["seed"]: i for i, s in enumerate(best["per_seed"])}
        common = sorted(set(mine) & set(theirs))
        r["vs_best"] = dict(paired(a[[mine[s] for s in common]], best_acc[[theirs[s] for s in common]]),
                            best=best["run"], all_seeds=len(common) == max(len(mine), len(theirs))) \
            if common else dict(best=best["run"], diff=None, why="no common seed")


def table(results: list[dict]) -> str:
    """A Markdown table: per run the mean over seeds with a 95% interval (what it covers is in the
    last column), the seeds' range, the selected and the last checkpoints' validation and test
    accuracy, and the paired comparison with the best run."""
    lines = ["| run | head | loss | options (not default) | N-way K-shot | accuracy (%) ± 95% CI | seeds: min-max | "
             "val / test, selected ckpt | val / test, last ckpt | vs best: diff, p | noise covered |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        vs = r["vs_best"]
        if vs is None:
            cmp = "best"
        elif vs.get("diff") is None:
            cmp = f"not compared with {vs['best']}: {vs['why']}"
        else:
            cmp = f"{100 * vs['diff']:+.2f} ± {100 * vs['ci95']:.2f}, {format_p(vs['p_value'])}"
            if not vs.get("all_seeds", True):
                cmp += f" (over the {vs['seeds']} seed(s) both have)"
        seeds = r["per_seed"]
        sel = f"{_mean_pct(seeds, 'val')} / {_mean_pct(seeds, 'test')}"
        last = f"{_mean_pct(seeds, 'last_val')} / {_mean_pct(seeds, 'last_test')}"
        options = format_options(changed_options(r["head"], r.get("head_options", {}))) or "defaults"
        lines.append(f"| {r['run']} | {r['head']} | {r['loss']} | {options} | {r['n_way']}-way {r['k_shot']}-shot | "
                     f"{100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f} | {r['seeds']}: "
                     f"{100 * r['seed_min']:.2f}-{100 * r['seed_max']:.2f} | {sel} | {last} | {cmp} | {r['noise']} |")
    return "\n".join(lines)


def _mean_pct(seeds: list[dict], key: str) -> str:
    values = [s[key] for s in seeds if key in s]
    return f"{100 * float(np.mean(values)):.2f}" if values else "-"
def write_metrics(path, result: dict, overwrite: bool = False) -> None:
    """The metrics JSON; a file holding another result is replaced only with `overwrite` (the same
    result compared with other runs, `vs_best`, is the same result)."""
    path = Path(path)
    text = json.dumps(result, indent=1)
    _refuse_other(path, lambda: _result_of(path) != _paths_resolved(dict(result, vs_best=None)), overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def write_accuracies(path, acc: np.ndarray, overwrite: bool = False) -> None:
    """The (seeds, E) per-episode accuracies (.npy), for paired comparisons; like write_metrics."""
    path = Path(path)
    _refuse_other(path, lambda: not np.array_equal(np.load(path), acc), overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, acc)


def _result_of(path: Path) -> dict | None:
    try:
        return _paths_resolved(dict(json.loads(path.read_text()), vs_best=None))
    except (OSError, ValueError):
        return None


def _paths_resolved(result: dict) -> dict:
    """A result with its file paths resolved: the same cache or checkpoint spelled another way
    (relative, absolute, through a link) is the same result."""
    def resolved(p):
        return str(Path(p).resolve())
    return dict(result, cache=resolved(result.get("cache", "")),
                per_seed=[dict(r, checkpoint=resolved(r["checkpoint"])) if "checkpoint" in r else r
                          for r in result.get("per_seed", [])])


def check_writable(path, target, overwrite: bool) -> None:
    """Before evaluating: a metrics file that holds the result of other checkpoints is refused now,
    not after the work (write_metrics compares the finished result)."""
    check_output(path, "metrics file")
    old = _result_of(Path(path)) if not overwrite and Path(path).exists() else None
    if old is not None and [s.get("checkpoint") for s in old.get("per_seed", [])] != \
            [str(Path(p).resolve()) for p in run_checkpoints(target)]:
        raise ConfigError(f"{path} holds the result of other checkpoints ({old.get('run')}); pass --overwrite to "
                          "replace it, or write elsewhere")


def _refuse_other(path: Path, differs, overwrite: bool) -> None:
    if path.exists() and not overwrite and differs():
        raise ConfigError(f"{path} holds another result; pass --overwrite to replace it, or write elsewhere")
