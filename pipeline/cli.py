"""`pipeline`: the command line, a thin Typer shell over the library and stages."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Few-shot video action recognition: extract MFNet features once, train and evaluate heads over the cache.")


def fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command("demo-data")
def demo_data(out: Path = typer.Option(Path("data/demo"), help="Folder to write the dataset to."),
              seed: int = typer.Option(0, help="Random seed: same seed, same videos."),
              videos_per_class: int = typer.Option(20, help="Videos per class."),
              min_seconds: float = typer.Option(2.0, help="Shortest video, seconds."),
              max_seconds: float = typer.Option(6.0, help="Longest video, seconds."),
              jobs: int = typer.Option(2, help="Parallel writer processes.")):
    """Generate the embedded synthetic demo dataset (folder-per-class videos + split files)."""
    from .demo_data import generate
    try:
        m = generate(out, seed, videos_per_class, (min_seconds, max_seconds), jobs)
    except FileExistsError as e:
        fail(str(e))
    n = sum(len(c) for c in m["classes"].values())
    typer.echo(f"demo dataset in {out}: {n} classes x {videos_per_class} videos; split files in {out / 'splits'}")


@app.command()
def scan(root: Path = typer.Option(..., help="Dataset root: one folder per class."),
         split: str = typer.Option(..., help="Split name under configs/splits (arn_ucf101, arn_hmdb51, ...) or a folder."),
         layout: str = typer.Option("folder", help="ucf101 | hmdb51 | folder."),
         allow_missing: bool = typer.Option(False, help="Go on when a per-video list names missing videos."),
         probe_videos: bool = typer.Option(False, "--probe", help="Open every video and report frames, fps and size.")):
    """Check a dataset against a split and report what was found."""
    from .datasets import DatasetError, load_split, resolve, summarize
    try:
        entries, problems = resolve(load_split(split), root, layout, allow_missing)
    except DatasetError as e:
        fail(str(e))
    typer.echo(summarize(entries, problems, probe_videos))


def main():
    app()
