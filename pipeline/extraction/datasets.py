"""Dataset layouts (UCF101, HMDB51, Kinetics, Something-Something-V2, folder-per-class) and
few-shot class splits.

A split is a folder with `{train,val,test}_classes.txt` (one class name per line) and, optionally,
`{train,val,test}_videos.txt` (one `Class/video_stem` per line). The named splits live in
`configs/splits/<name>/`.

Layouts: `folder`, `ucf101`, `hmdb51` and `kinetics` are a folder per class (Kinetics as
distributed: class names with spaces, files `<youtube_id>_<start:06d>_<end:06d>.mp4`; a copy with
underscores for spaces is found too). `ssv2` is the official Something-Something-V2 distribution:
one folder of `<id>.webm` files (`20bn-something-something-v2/`, or the root itself) and the label
files (`labels/something-something-v2-{labels,train,validation}.json`, or in the root); a class is
the template with its brackets removed, as the CMN split files name them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import PipelineError
from .video import VIDEO_EXTENSIONS

PARTS = ("train", "val", "test")
SPLITS_DIR = Path(__file__).resolve().parents[2] / "configs" / "splits"
LAYOUTS = ("ucf101", "hmdb51", "kinetics", "ssv2", "folder")
# (train, val, test) class counts that a named split must have.
EXPECTED_COUNTS = {
    "arn_ucf101": (70, 10, 21),
    "arn_hmdb51": (31, 10, 10),
    "cmn_kinetics100": (64, 12, 24),
    "cmn_ssv2_100": (64, 12, 24),
}
NAME_PATTERNS = {"ucf101": (re.compile(r"^v_[A-Za-z]+_g\d{2}_c\d{2}$"), "UCF101's v_<Class>_gXX_cYY"),
                 "kinetics": (re.compile(r"^.{11}_\d{6}_\d{6}$"), "Kinetics' <youtube_id>_<start:06d>_<end:06d>")}
SSV2_VIDEOS = "20bn-something-something-v2"
SSV2_LABELS = "something-something-v2-labels.json"
SSV2_LISTS = ("something-something-v2-train.json", "something-something-v2-validation.json")
SHOW = 5  # how many names an error lists before "..."


class DatasetError(PipelineError):
    """A dataset root or split that cannot be used; the message says what and where."""


@dataclass(frozen=True)
class VideoEntry:
    id: str          # "Class/stem"
    path: Path
    class_name: str
    part: str        # train / val / test
    label: int       # index of the class in train + val + test order


@dataclass
class Split:
    name: str
    classes: dict[str, list[str]]
    videos: dict[str, list[str]] | None = None

    def part_of(self) -> dict[str, str]:
        return {c: p for p in PARTS for c in self.classes[p]}

    @property
    def all_classes(self) -> list[str]:
        return [c for p in PARTS for c in self.classes[p]]


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _listing(names) -> str:
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > SHOW else ""
    return ", ".join(names[:SHOW]) + more


def load_split(split: str | Path, expected: tuple[int, int, int] | None = None) -> Split:
    """Load a split by name (configs/splits/<name>) or folder path and check it is well formed."""
    path = Path(split)
    if not path.is_dir():
        path = SPLITS_DIR / str(split)
    if not path.is_dir():
        known = sorted(p.name for p in SPLITS_DIR.iterdir()) if SPLITS_DIR.is_dir() else []
        raise DatasetError(f"split {split!r}: no such folder (known splits: {', '.join(known)})")
    classes, videos = {}, {}
    for part in PARTS:
        f = path / f"{part}_classes.txt"
        if not f.is_file():
            raise DatasetError(f"split {path}: missing {f.name}")
        classes[part] = _read_lines(f)
        if not classes[part]:
            raise DatasetError(f"{f}: lists no class (one class folder name per line)")
        if len(set(classes[part])) != len(classes[part]):
            dup = sorted({c for c in classes[part] if classes[part].count(c) > 1})
            raise DatasetError(f"{f}: duplicate classes: {_listing(dup)}")
        v = path / f"{part}_videos.txt"
        if v.is_file():
            videos[part] = _read_lines(v)
    if videos and len(videos) != len(PARTS):
        raise DatasetError(f"split {path}: per-video lists must be given for all of train/val/test or none")
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        both = set(classes[a]) & set(classes[b])
        if both:
            raise DatasetError(f"split {path}: classes in both {a} and {b}: {_listing(sorted(both))}")
    expected = expected or EXPECTED_COUNTS.get(path.name)
    counts = tuple(len(classes[p]) for p in PARTS)
    if expected and counts != tuple(expected):
        raise DatasetError(f"split {path}: expected {expected} train/val/test classes, found {counts}")
    for part, ids in videos.items():
        wrong = [i for i in ids if i.rsplit("/", 1)[0] not in classes[part]]
        if wrong:
            raise DatasetError(f"{path / f'{part}_videos.txt'}: videos of classes not in {part}: {_listing(wrong)}")
    return Split(path.name, classes, videos or None)


def scan(root: str | Path, layout: str = "folder") -> tuple[dict[str, list[Path]], list[tuple[str, str]]]:
    """Class folder -> sorted video files, plus (file, reason) for entries that are not videos."""
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    found, problems = {}, []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        vids = []
        for f in sorted(d.iterdir()):
            if f.name.startswith("."):
                continue
            if f.suffix.lower() in VIDEO_EXTENSIONS and not f.is_file():
                what = "a folder" if f.is_dir() else "a broken symbolic link" if f.is_symlink() else "not a regular file"
                problems.append((str(f), f"named like a video but {what}; skipped"))
                continue
            if not f.is_file() or f.suffix.lower() not in VIDEO_EXTENSIONS:
                problems.append((str(f), f"not a video file (extensions: {' '.join(VIDEO_EXTENSIONS)})"))
                continue
            if layout in NAME_PATTERNS and not NAME_PATTERNS[layout][0].match(f.stem):
                problems.append((str(f), f"name does not follow {NAME_PATTERNS[layout][1]}; used anyway"))
            vids.append(f)
        found[d.name] = vids
    return found, problems


def resolve(split: Split, root, layout: str = "folder", allow_missing: bool = False
            ) -> tuple[list[VideoEntry], list[tuple[str, str]]]:
    """The videos of a split under `root`, checked against the folders that exist.

    Every split class must be a folder under root. With per-video lists, the listed videos must
    exist (matched on `Class/stem`, any video extension); missing ones are an error naming them,
    or, with `allow_missing`, reported in the returned problems.
    """
    if layout == "ssv2":
        return resolve_ssv2(split, root, allow_missing)
    found, problems = scan(root, layout)
    if layout == "kinetics":     # copies that replaced the class names' spaces by underscores
        found.update({c: found[c.replace(" ", "_")] for c in split.all_classes
                      if c not in found and c.replace(" ", "_") in found})
    wanted = set(split.all_classes)
    problems = [(f, why) for f, why in problems if Path(f).parent.name in wanted]
    missing = [c for c in split.all_classes if c not in found]
    if missing:
        raise DatasetError(f"{len(missing)} class folder(s) of split {split.name} missing under {root}: "
                           f"{_listing(missing)}")
    empty = [c for c in split.all_classes if not found[c]]
    if empty:
        raise DatasetError(f"class folder(s) with no video file under {root}: {_listing(empty)}")
    label = {c: i for i, c in enumerate(split.all_classes)}
    files = {c: {f.stem: f for f in found[c]} for c in split.all_classes}
    entries = []
    for part in PARTS:
        if split.videos is None:
            entries += [VideoEntry(f"{c}/{s}", f, c, part, label[c]) for c in split.classes[part]
                        for s, f in files[c].items()]
        else:
            entries += _listed(split, part, root, label, allow_missing, problems,
                               lambda c, stem: files[c].get(stem))
    _refuse_same_stem(entries, found)
    return entries, problems


def _refuse_same_stem(entries: list[VideoEntry], found: dict[str, list[Path]]) -> None:
    """A video is named Class/stem: two files of one class with that stem (clip.avi, clip.mp4) cannot
    both be it, and picking one silently would hide the other; an error naming both."""
    files = {}
    for c in {e.class_name for e in entries}:
        for f in found[c]:
            files.setdefault((c, f.stem), []).append(f.name)
    twins = [f"{e.id}: " + " and ".join(files[e.class_name, e.path.stem]) for e in entries
             if len(files[e.class_name, e.path.stem]) > 1]
    if twins:
        raise DatasetError(f"{len(twins)} video(s) with more than one file in their class folder (rename or remove "
                           f"one of each): {_listing(twins)}")


def _listed(split: Split, part: str, root, label: dict, allow_missing: bool, problems: list, find) -> list[VideoEntry]:
    """The listed videos of `part` that `find(class, stem)` locates; the others are an error, or with
    `allow_missing` one problem line (`missing_videos` lists them)."""
    entries, absent = [], []
    for vid in split.videos[part]:
        c, stem = vid.rsplit("/", 1)
        f = find(c, stem)
        if f is None:
            absent.append(vid)
        else:
            entries.append(VideoEntry(vid, f, c, part, label[c]))
    if absent:
        msg = f"{len(absent)} of {len(split.videos[part])} {part} videos listed by split {split.name} " \
              f"are missing under {root}: {_listing(absent)}"
        if not allow_missing:
            raise DatasetError(msg + " (use --allow-missing to go on without them)")
        problems.append((str(root), msg))
    return entries


def missing_videos(split: Split, entries: list[VideoEntry]) -> dict[str, list[str]]:
    """part -> the videos the split lists that `entries` lacks (empty without per-video lists)."""
    have = {e.id for e in entries}
    return {p: [v for v in (split.videos or {}).get(p, []) if v not in have] for p in PARTS}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable JSON file ({e})") from None


def resolve_ssv2(split: Split, root, allow_missing: bool = False) -> tuple[list[VideoEntry], list[tuple[str, str]]]:
    """The split's videos in the official Something-Something-V2 layout: `Class/<id>` -> `<id>.webm`.
    Every class must be a template of the label file, and a listed id that the train or validation
    list gives another template is an error. Without per-video lists, a class's videos are the ids
    the two lists give its template."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    videos = root / SSV2_VIDEOS if (root / SSV2_VIDEOS).is_dir() else root
    labels = next((d for d in (root / "labels", root, root.parent / "labels") if (d / SSV2_LABELS).is_file()), None)
    if labels is None:
        raise DatasetError(f"{root}: no {SSV2_LABELS} in {root / 'labels'}, {root} or {root.parent / 'labels'} "
                           "(the official distribution's label files)")
    names = _read_json(labels / SSV2_LABELS)
    if not isinstance(names, dict):
        raise DatasetError(f"{labels / SSV2_LABELS}: expected an object of template -> index, got {type(names).__name__}")
    unknown = [c for c in split.all_classes if c not in names]
    if unknown:
        raise DatasetError(f"{len(unknown)} class(es) of split {split.name} are not templates of "
                           f"{labels / SSV2_LABELS}: {_listing(unknown)}")
    template = {}                               # video id -> class (template without brackets)
    for name in SSV2_LISTS:
        path = labels / name
        if not path.is_file():
            continue
        listed = _read_json(path)
        try:
            template.update({str(e["id"]): e["template"].replace("[", "").replace("]", "") for e in listed})
        except (TypeError, KeyError, AttributeError) as e:
            raise DatasetError(f"{path}: expected a list of objects with id and template ({e!r})") from None
    files = {p.stem: p for p in videos.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS}
    label = {c: i for i, c in enumerate(split.all_classes)}
    entries, problems = [], []
    for part in PARTS:
        if split.videos is None:
            wanted = set(split.classes[part])
            entries += [VideoEntry(f"{c}/{i}", files[i], c, part, label[c]) for i, c in sorted(template.items())
                        if c in wanted and i in files]
            continue
        wrong = [(v, template[v.rsplit("/", 1)[1]]) for v in split.videos[part]
                 if template.get(v.rsplit("/", 1)[1], v.rsplit("/", 1)[0]) != v.rsplit("/", 1)[0]]
        if wrong:
            raise DatasetError(f"{len(wrong)} video(s) of split {split.name} have another template in the label "
                               f"lists of {labels}: " + _listing(f"{v} is {t!r}" for v, t in wrong))
        entries += _listed(split, part, videos, label, allow_missing, problems, lambda c, stem: files.get(stem))
    return entries, problems


def summarize(entries: list[VideoEntry], problems: list[tuple[str, str]], probe_videos: bool = False,
              missing: dict[str, list[str]] | None = None) -> str:
    """A human-readable report of a resolved split: classes and videos per part, listed videos
    missing per part and class, problems, and (with `probe_videos`) frame counts, fps and sizes
    read from every file."""
    from .video import VideoError, probe

    lines = []
    for part in PARTS:
        vids = [e for e in entries if e.part == part]
        per = {}
        for e in vids:
            per[e.class_name] = per.get(e.class_name, 0) + 1
        if per:
            lines.append(f"{part:5s}: {len(per):3d} classes, {len(vids):6d} videos "
                         f"({min(per.values())}-{max(per.values())} per class)")
        gone = (missing or {}).get(part, [])
        if gone:
            by_class = {}
            for v in gone:
                by_class[v.rsplit("/", 1)[0]] = by_class.get(v.rsplit("/", 1)[0], 0) + 1
            lines.append(f"       {len(gone)} listed video(s) missing, in {len(by_class)} class(es): "
                         + ", ".join(f"{c} {n}" for c, n in sorted(by_class.items(), key=lambda t: -t[1])))
    if probe_videos:
        frames, bad = [], []
        for e in entries:
            try:
                n, fps, w, h = probe(e.path)
                frames.append(n)
            except VideoError as err:
                bad.append((str(e.path), err.reason))
        if frames:
            lines.append(f"frames per video (header): min {min(frames)}, median {sorted(frames)[len(frames) // 2]}, "
                         f"max {max(frames)}")
        problems = problems + bad
    if problems:
        lines.append(f"{len(problems)} problem(s):")
        lines += [f"  {f}: {why}" for f, why in problems[:20]]
        if len(problems) > 20:
            lines.append(f"  ... and {len(problems) - 20} more")
    return "\n".join(lines)
