"""`pipeline`: the command line, a thin Typer shell over the library and stages."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Few-shot video action recognition: extract MFNet features once, train and evaluate heads over the cache.")
_debug = False


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", envvar="PIPELINE_DEBUG",
                                     help="Show the traceback of an error instead of one line.")):
    global _debug
    _debug = debug


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main():
    """Runs a command; an input error (PipelineError) or a bad argument ends as one line naming the
    file, option or value and the reason, with exit code 2."""
    from typer._click import exceptions as click   # typer (pinned) vendors its own click

    from .errors import PipelineError
    # Slurm's time limit and pre-emption, and `kill`, send SIGTERM: stopped as by Ctrl-C (workers
    # stopped, lock released, the rerun resumes), not dropped mid-part with the lock left behind
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = app(standalone_mode=False)
    except click.NoArgsIsHelpError as e:
        typer.echo(e.format_message())
        sys.exit(0)
    except (PipelineError, click.ClickException) as e:
        if _debug:
            raise
        message = e.format_message() if isinstance(e, click.ClickException) else str(e)
        where = f" (see `{e.ctx.command_path} --help`)" if isinstance(e, click.UsageError) and e.ctx else ""
        typer.secho(f"error: {' '.join(message.split())}{where}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except OSError as e:
        from .errors import explain_os_error
        line = explain_os_error(e)
        if line is None or _debug:
            raise
        typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    if code == 130:     # Ctrl-C: typer turns it into exit code 130
        typer.echo("interrupted: run the same command again (extract resumes from its finished part files, train from "
                   "last.pt; the others start over, nothing half-written is kept)", err=True)
    sys.exit(code if isinstance(code, int) else 0)


@app.command("demo-data")
def demo_data(out: Path = typer.Option(Path("data/demo"), help="Folder to write the dataset to."),
              seed: int = typer.Option(0, help="Random seed: same seed, same videos."),
              videos_per_class: int = typer.Option(20, min=1, help="Videos per class."),
              min_seconds: float = typer.Option(2.0, min=0.1, help="Shortest video, seconds."),
              max_seconds: float = typer.Option(6.0, help="Longest video, seconds."),
              jobs: int = typer.Option(2, min=1, help="Parallel writer processes.")):
    """Generate the embedded synthetic demo dataset (folder-per-class videos + split files)."""
    from .tools.demo_data import generate
    m = generate(out, seed, videos_per_class, (min_seconds, max_seconds), jobs)
    n = sum(len(c) for c in m["classes"].values())
    typer.echo(f"demo dataset in {out}: {n} classes x {videos_per_class} videos; split files in {out / 'splits'}")


@app.command()
def standins(out: Path = typer.Option(Path("data/tm_standins"), help="Folder to write features/ and episodes/ to."),
             dataset: str = typer.Option("ucf101", help="The dataset name their folders carry (ucf101 | kinetics | ssv2)."),
             videos_per_class: int = typer.Option(12, min=6, help="Videos per class (5-shot episodes with a query need 6)."),
             episodes: int = typer.Option(200, min=1, help="Saved test episodes per shot (theirs: 10,000)."),
             seed: int = typer.Option(0, help="Random seed of the features: same seed, same files.")):
    """Generate stand-ins for the matching study's release in its exact formats: per-video feature
    files (torch.save, 512-d) and saved 5-way 1- and 5-shot test episodes (docs/temporal-matching.md)."""
    from .tools.standins import write_standins
    if out.exists():
        import shutil
        shutil.rmtree(out)          # regenerated whole: no stale files of another seed or size
    write_standins(out, dataset, videos_per_class, episodes=episodes, seed=seed)
    typer.echo(f"stand-ins in {out}: features/{dataset}/ (train, val, test) and episodes/{dataset}/{dataset}_w5_s1, _s5 "
               f"({episodes} episodes each)")


LAYOUT_HELP = "ucf101 | hmdb51 | kinetics | ssv2 | folder (see docs/datasets.md)."


@app.command()
def scan(root: Path = typer.Option(..., help="Dataset root: one folder per class (ssv2: the distribution's folder)."),
         split: str = typer.Option(..., help="Split name under configs/splits (arn_ucf101, cmn_kinetics100, ...) or a folder."),
         layout: str = typer.Option("folder", help=LAYOUT_HELP),
         missing_list: Path = typer.Option(Path("missing-videos.txt"), help="Where the ids of listed but missing videos are written (when there are any)."),
         probe_videos: bool = typer.Option(False, "--probe", help="Open every video and report frames, fps and size.")):
    """Check a dataset against a split: videos per part, listed videos missing per part and class, problems."""
    from .extraction.datasets import load_split, missing_videos, resolve, summarize
    sp = load_split(split)
    entries, problems = resolve(sp, root, layout, allow_missing=True)
    missing = missing_videos(sp, entries)
    typer.echo(summarize(entries, [p for p in problems if p[0] != str(root) and "listed by split" not in p[1]],
                         probe_videos, missing))
    if probe_videos:    # the same file in two parts inflates a test result: extract refuses it
        from .extraction.extractor import duplicate_groups, file_digests
        rows = [[e.id, e.part, e.label, d] for e, d in zip(entries, file_digests([e.path for e in entries], 2))]
        for g in duplicate_groups(rows):
            parts = sorted({p for _, p in g})
            where = f"across parts {'/'.join(parts)}: extract refuses them" if len(parts) > 1 else f"within {parts[0]}"
            typer.echo(f"byte-identical files ({where}): {' = '.join(v for v, _ in g)}")
    ids = [v for part in missing.values() for v in part]
    if ids:
        missing_list.write_text("\n".join(ids) + "\n")
        typer.echo(f"{len(ids)} listed video(s) missing; their ids are in {missing_list} (extract needs "
                   "--allow-missing, which records them in the cache)")


@app.command()
def extract(root: Path = typer.Option(..., help="Dataset root: one folder per class."),
            split: str = typer.Option(..., help="Split name under configs/splits or a split folder."),
            out: Path = typer.Option(..., help="Cache file to write, e.g. cache/ucf101.h5."),
            layout: str = typer.Option("folder", help=LAYOUT_HELP),
            weights: Optional[str] = typer.Option(None, help="MFNet Kinetics-400 checkpoint (MFNet3D_Kinetics-400_72.8.pth). Without it (or empty): random init, demo only."),
            sampling: str = typer.Option("segments", help="segments (paper: T equal segments) | dense (every F-frame window)."),
            clips: int = typer.Option(3, min=1, help="segments: clips per video (T)."),
            frames: int = typer.Option(16, min=1, help="Frames per clip (F)."),
            step: int = typer.Option(1, min=1, help="dense: frame step inside a window."),
            stride: Optional[int] = typer.Option(None, min=1, help="dense: frames between window starts (default: non-overlapping)."),
            resize_mode: str = typer.Option("fixed", help="fixed (resize x resize, the paper) | short (shorter side = resize)."),
            resize: int = typer.Option(256, min=1, help="Resize target before cropping."),
            crop: int = typer.Option(112, min=1, help="Crop size."),
            views: int = typer.Option(1, min=1, help="How many crops per clip (a count): view 0 is the centre crop, views 1..V-1 seeded random crops (+ flip); 1 = the centre crop only."),
            seed: int = typer.Option(0, help="Seed of the random views (and of the random network without --weights)."),
            flip: bool = typer.Option(True, help="Random horizontal flip in views >= 1."),
            layer: str = typer.Option("tail", help="tail (after the final BN+ReLU) | conv5."),
            dtype: str = typer.Option("float16", help="Stored map dtype: float16 | float32."),
            compression: str = typer.Option("lzf", help="The maps: none | lzf | gzip (with shuffle) | blosc-lz4 (5x faster to write than lzf, 9% larger; docs/cache.md)."),
            precision: str = typer.Option("fp32", help="Compute precision: fp32 | bf16 | fp16 (autocast; stored dtype unchanged)."),
            device: str = typer.Option("auto", help="auto | cpu | cuda."),
            batch_size: int = typer.Option(8, min=1, help="Clips per forward batch (batches span videos)."),
            workers: int = typer.Option(min(8, os.cpu_count() or 1), min=0, help="Processes that decode the videos and write the parts (0 = all in this process); the default is this machine's cores, at most 8."),
            shard: Optional[str] = typer.Option(None, help="i/N: extract only shard i of N (default: from torchrun or a Slurm array)."),
            part_size: int = typer.Option(32, min=1, help="Videos per crash-safe part file."),
            channels_last: bool = typer.Option(True, help="channels_last_3d memory format for the forward (faster on CPU)."),
            overwrite: bool = typer.Option(False, help="Replace a cache made with other settings."),
            allow_duplicates: bool = typer.Option(False, "--allow-duplicates", help="Go on when byte-identical files are in more than one part (train/val/test); recorded in the cache. Refused by default: a test video seen in training inflates results."),
            allow_missing: bool = typer.Option(False, "--allow-missing/--refuse-missing", help="Go on when a per-video list names missing videos (recorded in the cache's provenance, and reported by eval), or refuse (the default)."),
            summary_file: Optional[Path] = typer.Option(None, "--summary", help="Also write the cache's content digest, settings hash and counts to this JSON (what DVC tracks: the same values give the same bytes)."),):
    """Stage one: run MFNet over every clip and write the HDF5 feature cache (resumable, shardable)."""
    from .extraction.backbone import Backbone
    from .extraction.datasets import load_split, missing_videos, resolve
    from .extraction.extractor import extract_features
    from .extraction.settings import ExtractSettings
    from .extraction.video import Preprocess, Sampling
    from .extraction.extractor import parse_shard, shard_path
    from .files import exclusive
    sp = load_split(split)
    target = shard_path(out, *parse_shard(shard))
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(target, "feature cache"):     # before the dataset scan and the backbone: a second writer waits for nothing
        entries, problems = resolve(sp, root, layout, allow_missing)
        for f, why in problems:
            typer.echo(f"skipped {f}: {why}", err=True)
        backbone = Backbone.load(weights or None, seed)
        settings = ExtractSettings(Sampling(sampling, clips, frames, step, stride), Preprocess(resize_mode, resize, crop),
                                   views, seed, flip, layer, dtype, compression, precision, backbone.sha256)
        summary = extract_features(entries, out, settings, backbone, batch_size=batch_size, workers=workers,
                                   device=device, shard=shard, part_size=part_size, overwrite=overwrite,
                                   channels_last=channels_last, allow_duplicates=allow_duplicates,
                                   extra_provenance=dict(root=str(root), layout=layout, split=sp.name,
                                                         missing=missing_videos(sp, entries)))
    if summary_file:
        import json

        from .files import atomic_write_text
        from .store import content_summary
        summary_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(summary_file, json.dumps(content_summary(summary["path"]), indent=1, sort_keys=True) + "\n")
    if summary["status"] == "up to date":
        typer.echo(f"{summary['path']}: up to date ({summary['videos']} videos), nothing to do")
        if not summary["files_compared"]:
            typer.echo("  (written before caches recorded their files' sha256: only the video ids were compared; "
                       "--overwrite extracts it again with them)", err=True)
        return
    typer.echo(f"{summary['path']}: {summary['videos']} videos, {summary['clips']} clip rows, "
               f"{summary['bytes'] / 1e6:.1f} MB; computed {summary['computed_clips']} clips in "
               f"{summary['seconds']:.1f} s ({summary['clips_per_s']:.1f} clips/s)"
               + (f", resumed {summary['resumed_parts']} finished part(s)" if summary["resumed_parts"] else ""))
    if summary["warnings"]:
        typer.echo(f"{len(summary['warnings'])} video(s) used with a warning (recorded in the cache, shown by info):")
        for vid, why in summary["warnings"]:
            typer.echo(f"  {vid}: {why}")
    if summary["failures"]:
        typer.echo(f"{len(summary['failures'])} video(s) failed and were recorded in the cache:")
        for vid, why in summary["failures"]:
            typer.echo(f"  {vid}: {why}")


@app.command("import-features")
def import_features_cmd(root: Path = typer.Option(..., help="Folder of per-video feature files (see --layout)."),
                        out: Path = typer.Option(..., help="Feature cache (.h5) to write."),
                        backbone: str = typer.Option(..., help="The network the features came from, as you name it (recorded, and part of the settings: caches of other backbones never mix), e.g. r2plus1d_34."),
                        layout: str = typer.Option("temporal_matching", help="temporal_matching (their release: one folder a video) | files (one .npy/.pth a video); see docs/temporal-matching.md."),
                        split: Optional[str] = typer.Option(None, help="files layout: a split (folder or name) saying which class is in which part; its *_videos.txt, if any, picks the videos."),
                        workers: int = typer.Option(2, min=1, help="Processes reading, checking and hashing files (about one per core)."),
                        drop_nonfinite: bool = typer.Option(False, "--drop-nonfinite", help="Record a video whose features hold a NaN or infinity as failed and go on, instead of stopping."),
                        allow_duplicates: bool = typer.Option(False, "--allow-duplicates", help="Go on when one file (same sha256) is in two parts; recorded in the cache."),
                        overwrite: bool = typer.Option(False, help="Replace a cache imported from other files or with other settings."),
                        summary_file: Optional[Path] = typer.Option(None, "--summary", help="Also write the cache's content digest, settings hash and counts to this JSON (what DVC tracks).")):
    """Import another tool's per-video clip features (no video, no network): a cache of pooled clip
    vectors, with the same integrity as an extracted one; heads that read pooled clips train on it."""
    import json
    from .files import atomic_write_text
    from .importing import import_features
    from .store import content_summary
    r = import_features(root, out, layout, backbone, split, workers, overwrite, drop_nonfinite, allow_duplicates)
    if summary_file:
        summary_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(summary_file, json.dumps(content_summary(out), indent=1, sort_keys=True) + "\n")
    if r["status"] == "up to date":
        typer.echo(f"{out}: up to date ({r['videos']} videos, the same files), nothing to do")
        return
    typer.echo(f"{out}: {r['videos']} videos, {r['clips']} clips of {r['feature_size']}-d features imported in "
               f"{r['seconds']:.1f} s ({r['videos_per_s']:.0f} videos/s)")
    for vid, why in r["failed"]:
        typer.echo(f"  failed: {vid}: {why}")


@app.command("import-episodes")
def import_episodes_cmd(folder: Path = typer.Argument(..., help="A folder of saved episodes, e.g. ucf101/ucf101_w5_s1 (support_set_<i>.pth, ...)."),
                        cache: Path = typer.Option(..., help="The cache imported from the same release's features (`pipeline import-features`)."),
                        out: Path = typer.Option(..., help="Episode file (.npz) to write: give it to `pipeline eval --episodes-file`."),
                        count: Optional[int] = typer.Option(None, min=1, help="Import only the first COUNT episodes (default: all)."),
                        part: str = typer.Option("test", help="The part the episodes were drawn from."),
                        overwrite: bool = typer.Option(False, help="Replace an existing episode file.")):
    """Import another tool's saved test episodes (the matching study's format): every member found in
    the cache by its frame names and checked against its saved features, so `eval --episodes-file`
    scores exactly the sequences they scored."""
    from .errors import ConfigError
    from .files import check_output, exclusive
    from .importing import import_episodes
    check_output(out, "episode file")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
    with exclusive(out, "episode file"):
        r = import_episodes(folder, cache, out, count, part)
    typer.echo(f"{out}: {r['count']} episodes, {r['n_way']}-way {r['k_shot']}-shot, {r['q_query']} quer{'y' if r['q_query'] == 1 else 'ies'} per class, "
               f"{r['clips']} clips per video, from {folder}")


@app.command("merge")
def merge_cmd(shards: List[Path] = typer.Argument(..., help="Shard files written by `extract --shard i/N`."),
              out: Path = typer.Option(..., help="Merged cache file.")):
    """Join shard caches into one, checking settings agree and every video is present exactly once."""
    from .files import exclusive
    from .store import FeatureStore, merge
    with exclusive(out, "feature cache"):
        n = merge(shards, out)
    with FeatureStore(out) as s:
        total = s.provenance.get("shard", "0/1").split("/")[1]
    if str(len(shards)) != total:
        typer.echo(f"warning: {len(shards)} shard file(s) given but they were written as {total} shards", err=True)
    typer.echo(f"{out}: {n} videos from {len(shards)} shard(s)")


@app.command()
def upgrade(cache: Path = typer.Argument(..., help="A feature cache written by an earlier version.")):
    """Bring a cache to the current format: adds the per-time-step view (/steps) from its maps, read
    once; resumable (run it again after an interruption), and the cache is replaced only when complete."""
    from .store import upgrade as run_upgrade
    typer.echo(run_upgrade(cache))


HEAD_FILE_HELP = "A Python file of your own heads (registered with @register); recorded in the checkpoint."


@app.command()
def heads(head_file: Optional[Path] = typer.Option(None, help=HEAD_FILE_HELP)):
    """List the registered heads: what each reads from the cache, what it is, and its options."""
    from .fewshot import heads as registry
    if head_file:
        registry.load_head_file(head_file)
    for name, cls in sorted(registry.HEADS.items()):
        doc = " ".join((cls.__doc__ or "").split()).split(". ")[0]
        reads = cls.consumes + ("|steps" if "per_step" in {f[0] for f in registry.option_fields(cls)} else "")
        kind, own = cls.scoring(cls.Options())
        typer.echo(f"{name:8s} reads {reads:12s}  {doc}")
        typer.echo(f"{'':10s}scores: {kind}; its own loss: {own}")
        for opt, typ, default, meta in registry.option_fields(cls):
            bounds = registry.valid_range(meta)
            typer.echo(f"{'':10s}--head-opt {opt}=... ({registry.type_name(typ)}, default {registry.show(default)}"
                       f"{', ' + bounds if bounds else ''}): {meta.get('help', '')}")


@app.command()
def train(ctx: typer.Context,
          cache: Path = typer.Option(..., help="Feature cache written by `pipeline extract` or `pipeline import-features`."),
          out: Path = typer.Option(..., help="Run folder: best.pt, last.pt, curve.csv/json."),
          head: str = typer.Option("lstm", help="Head name (see `pipeline heads`)."),
          head_opt: List[str] = typer.Option([], "--head-opt", help="A head option as key=value (repeat; see `pipeline heads`), e.g. --head-opt hidden=256."),
          head_file: Optional[Path] = typer.Option(None, help=HEAD_FILE_HELP),
          loss: Optional[str] = typer.Option(None, help="Default: the head's own (see `pipeline heads`). circle (one prototype per class) | circle_per_video (the paper's K-shot form) | ce | mse (regress scores to the one-hot target, as RVN); a loss that cannot train the head's scores is refused."),
          gamma: float = typer.Option(128.0, help="circle: scale factor gamma."),
          margin: float = typer.Option(0.4, help="circle: relaxation margin m."),
          scale: Optional[float] = typer.Option(None, help="ce: multiplier of the scores (default: 10 on cosine scores, 1 on logits)."),
          optimizer: str = typer.Option("head", help="head (Adam, for cached features) | paper (SGD 1e-5) | study (the matching study's: plain SGD 1e-3, clip 1000, 20,002 episodes)."),
          lr: Optional[float] = typer.Option(None, help="Learning rate (default: the preset's)."),
          episodes: Optional[int] = typer.Option(None, help="Training episodes (default: the preset's)."),
          n_way: int = typer.Option(5, help="Classes per episode (N)."),
          k_shot: int = typer.Option(1, help="Support videos per class (K)."),
          q_query: int = typer.Option(1, help="Training queries per class."),
          val_every: int = typer.Option(250, help="Validate every this many episodes."),
          val_episodes: int = typer.Option(300, help="Fixed validation episodes."),
          val_query: int = typer.Option(15, help="Queries per class in validation episodes."),
          seed: int = typer.Option(0, help="Seed of initialisation and episode sampling (the first seed)."),
          seeds: int = typer.Option(1, help="Training seeds: seed, seed+1, ... each in OUT/seed-N/ (the presets use 3)."),
          train_views: str = typer.Option("all", help="Cached crops drawn per video per episode: all (centre crop included) | random (only the random crops, views >= 1: the paper's training crop)."),
          sampler: str = typer.Option("segments", help="How training draws a video's clips: segments (ours: T equal segments, a short video's clips spread in order) | study (the matching study's loader: a short video padded with its last clip)."),
          seed_list: Optional[str] = typer.Option(None, help="Explicit training seeds, comma-separated (the matching study's: 1,5,10), instead of --seed/--seeds."),
          features_dtype: str = typer.Option("float32", help="Pooled clip vectors in memory: float32 | float16 (half the memory: SSv2's imported train part)."),
          device: str = typer.Option("cpu", help="Where the head trains: cpu | cuda | auto (not part of the run's settings)."),
          drop_nonfinite: bool = typer.Option(False, "--drop-nonfinite", help="Leave out videos whose cached features hold a NaN or infinity (named, and recorded in the checkpoint) instead of stopping."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run in OUT trained with another head, options, settings or cache (otherwise refused)."),
          params: Optional[Path] = typer.Option(None, help="Take the training settings from this params file (e.g. params.yaml) ..."),
          run: Optional[str] = typer.Option(None, help="... entry runs.RUN of it (then no other training option may be given).")):
    """Stage two: train a head episodically on the cache; keeps the best-on-validation checkpoint."""
    from .errors import ConfigError
    from .fewshot.heads import parse_assignments
    from .fewshot.train import TrainConfig, train as run_train
    if (params is None) != (run is None):
        raise ConfigError("--params and --run go together")
    if params:
        given = [n for n in ctx.params if n not in ("cache", "out", "params", "run", "device", "drop_nonfinite", "overwrite")
                 and ctx.get_parameter_source(n).name == "COMMANDLINE"]
        if given:
            raise ConfigError(f"--run {run} takes its settings from {params}; do not also give "
                              + ", ".join("--" + g.replace("_", "-") for g in given))
        cfg = TrainConfig.from_mapping(run_entry(params, run), f"{params}: runs.{run}")
    else:
        cfg = TrainConfig(head, parse_assignments(head_opt), str(head_file) if head_file else None, loss, gamma, margin,
                          scale, optimizer, lr, episodes, n_way, k_shot, q_query, val_every, val_episodes, val_query,
                          seed, seeds, train_views, sampler, _seed_list(seed_list), features_dtype)
    for r in run_train(cache, out, cfg, log=typer.echo, device=device, drop_nonfinite=drop_nonfinite,
                       overwrite=overwrite):
        trained = (f"at episode {r['best_episode']} of {r['episodes']} ({r['seconds']:.1f} s, {r['val_seconds']:.1f} s "
                   "of it validating)"
                   if r["episodes"] else "(no parameters: scored on validation, not trained)")
        typer.echo(f"{r['folder']}: best validation accuracy {100 * r['best_val']:.2f}% {trained}; checkpoint "
                   f"{r['folder']}/best.pt")


def _seed_list(text: Optional[str]) -> Optional[list]:
    from .errors import ConfigError
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seed-list must be integers separated by commas, got {text!r}") from None


def run_entry(params: Path, run: str) -> dict:
    """The mapping runs.RUN of a params file, with errors naming the file and the key."""
    import yaml

    from .errors import ConfigError, MissingFile
    if not params.is_file():
        raise MissingFile(f"params file {params} does not exist")
    try:
        doc = yaml.safe_load(params.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{params}: not valid YAML ({e})") from None
    runs = doc.get("runs") if isinstance(doc, dict) else None
    if not isinstance(runs, dict) or run not in runs:
        known = ", ".join(runs) if isinstance(runs, dict) else "none"
        raise ConfigError(f"{params}: no run runs.{run} (runs there: {known})")
    return runs[run]


@app.command("eval")
def eval_cmd(click_ctx: typer.Context, checkpoints: List[Path] = typer.Argument(..., help="Run folders (every seed's best.pt) or checkpoint files; several: a comparison table."),
             cache: Path = typer.Option(..., help="Feature cache the heads were trained on."),
             metrics: Optional[Path] = typer.Option(None, help="Metrics JSON to write (one checkpoint) or a folder (several)."),
             n_way: int = typer.Option(5, min=2, help="N-way."),
             k_shot: Optional[int] = typer.Option(None, min=1, help="K-shot (default: the K the checkpoints were trained with)."),
             q_query: int = typer.Option(15, min=1, help="Queries per class."),
             episodes: int = typer.Option(600, min=1, help="Episodes per run."),
             runs: int = typer.Option(10, min=1, help="Runs."),
             seed: int = typer.Option(0, help="Seed of the fixed test episodes."),
             part: str = typer.Option("test", help="test | val."),
             device: str = typer.Option("cpu", help="Where the heads run: cpu | cuda | auto."),
             drop_nonfinite: bool = typer.Option(False, "--drop-nonfinite", help="Leave out test videos whose cached features hold a NaN or infinity (listed under the table and in the metrics) instead of stopping."),
             accuracies: Optional[Path] = typer.Option(None, help="Also save the (seeds, episodes) accuracies (.npy, one run) for paired comparisons in `pipeline report`."),
             episodes_file: Optional[Path] = typer.Option(None, help="Score these saved episodes (written by `pipeline import-episodes`) instead of drawing fixed ones: N, K, Q and the count are the file's; --runs splits them into runs."),
             overwrite: bool = typer.Option(False, help="Replace metrics or accuracies files that hold another result.")):
    """Evaluate with the paper's protocol on fixed episodes; prints a table, writes metrics JSON."""
    from .errors import ConfigError
    from .fewshot.evaluate import (check_writable, dropped_note, evaluate, missing_note, run_name, table,
                                   write_accuracies, write_metrics)
    from .files import check_output
    if accuracies and len(checkpoints) > 1:
        raise ConfigError("--accuracies saves one run's accuracies: give one run folder or checkpoint")

    def metrics_file(target):
        """--metrics is the file for one target, the folder of `<name>.json` files for several."""
        return metrics if len(checkpoints) == 1 else metrics / f"{run_name(target)}.json"

    if accuracies:
        check_output(accuracies, "accuracies file")
    if metrics:
        names = [run_name(c) for c in checkpoints]
        if len(set(names)) < len(names):
            raise ConfigError(f"--metrics {metrics}: two targets share the name {names}; evaluate them separately")
        for c in checkpoints:
            check_writable(metrics_file(c), c, overwrite)
    if episodes_file:
        given = [n for n in ("n_way", "q_query", "episodes", "seed")
                 if click_ctx.get_parameter_source(n).name == "COMMANDLINE"]
        if given:
            raise ConfigError(f"--episodes-file {episodes_file} fixes N, Q, the episodes and their draw; do not also "
                              "give " + ", ".join("--" + g.replace("_", "-") for g in given))
    results, accs = evaluate([str(c) for c in checkpoints], cache, n_way, k_shot, q_query, episodes, runs, seed, part,
                            device, drop_nonfinite, episodes_file)
    typer.echo(table(results))
    for note in (missing_note(results), dropped_note(results)):
        if note:
            typer.echo(note)
    if accuracies:
        write_accuracies(accuracies, accs[0], overwrite)
    if metrics:
        for c, r in zip(checkpoints, results):
            write_metrics(metrics_file(c), r, overwrite)


@app.command()
def predict(checkpoint: Path = typer.Option(..., help="A trained head (best.pt)."),
            support: Path = typer.Option(..., help="Folder with one sub-folder of example videos per new class."),
            query: List[Path] = typer.Argument(..., help="Query videos or folders of videos."),
            weights: Optional[str] = typer.Option(None, help="MFNet weights (default: the file recorded when the cache was made)."),
            head_file: Optional[Path] = typer.Option(None, help="Where the head's file is now, if it moved since training (its sha256 must match)."),
            cache_dir: Path = typer.Option(Path("cache/predict"), help="Where per-video features are kept for reuse."),
            device: str = typer.Option("auto", help="auto | cpu | cuda."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON."),
            as_csv: bool = typer.Option(False, "--csv", help="Print CSV.")):
    """Recognise your own actions: classify query videos against K example videos per new class."""
    from .tools.predict import format_table, predict as run_predict, to_json
    out = run_predict(checkpoint, support, query, weights, cache_dir, device, str(head_file) if head_file else None)
    if as_json:
        typer.echo(to_json(out))
    elif as_csv:
        typer.echo("query,predicted,margin," + ",".join(out["classes"]))
        for r in out["results"]:
            if "error" in r:
                typer.echo(f"{r['query']},,,{','.join('' for _ in out['classes'])}")
            else:
                typer.echo(f"{r['query']},{r['predicted']},{r['margin']:.4f}," +
                           ",".join(f"{r['scores'][c]:.4f}" for c in out["classes"]))
    else:
        typer.echo(format_table(out))
        typer.echo(f"{len(out['classes'])} classes from {out['support_videos']} support videos "
                   f"({out['reused_support']} reused from {cache_dir}); {out['decoded']} video(s) decoded")
    for f, why in out["support_failures"]:
        typer.echo(f"skipped support file {f}: {why}", err=True)
    for r in out["results"]:
        if "error" in r:
            typer.echo(f"query {r['query']} could not be read: {r['error']}", err=True)
    if all("error" in r for r in out["results"]):
        from .tools.predict import PredictError
        raise PredictError(f"none of the {len(out['results'])} query videos could be read (reasons above)")


@app.command()
def info(path: Path = typer.Argument(..., help="A feature cache (.h5) or a checkpoint (.pt)."),
         verify: bool = typer.Option(False, "--verify", help="Cache: read every stored value and compare it with the digests recorded when it was written (names damaged videos).")):
    """Inspect a cache (provenance, counts, failures, size) or a checkpoint (head, options, training, cache)."""
    from .tools.info import describe
    if verify and path.suffix not in (".h5", ".hdf5"):
        from .errors import ConfigError
        raise ConfigError(f"--verify checks a feature cache (.h5); {path} is not one")
    typer.echo(describe(path))
    if verify:
        from .store import CacheError, verify as run_verify
        checked, problems = run_verify(path)
        for p in problems:
            typer.echo(f"  {p}", err=True)
        if problems:
            raise CacheError(f"{path}: {len(problems)} problem(s) found by --verify (listed above); extract it again "
                             "(`pipeline extract ... --overwrite`)")
        typer.echo(f"verified: the stored values of {checked} videos equal those written")


@app.command()
def report(metrics: Path = typer.Option(Path("metrics"), help="Folder of metrics JSON (+ .npy) written by `pipeline eval`."),
           runs: Path = typer.Option(Path("runs/dvc"), help="Folder of run folders (best.pt, curve.csv)."),
           cache: Optional[Path] = typer.Option(None, help="Feature cache, for the similarity matrix and t-SNE."),
           out: Path = typer.Option(Path("reports"), help="Where tables, figures and index.md go.")):
    """The paper's tables and figures: results table, similarity matrix, t-SNE, sweep curves, learning curves."""
    from .tools.report import report as run_report
    for f in run_report(metrics, runs, cache, out):
        typer.echo(f"wrote {f}")
