"""The checkpoint format, in one place: what `train` saves and everything else loads.

A checkpoint is a torch file holding a dict: `format` (FORMAT), the head's registered name, its
options, the user head file (path + sha256) when the head came from one, the training config,
the identity of the cache it was trained on (path, settings, settings hash, provenance), the
head's state_dict, the episode and validation accuracy it was saved at, and, in `last.pt` only,
what resuming needs (`resume`: optimizer, scheduler, RNG states, curve).
Format 1 (before head options existed) is read as well: its `head_config` becomes the options.
Format 2 (before the heads were held to their authors' code) is read with the options that give its
heads' computation back where the defaults changed (chamfer, diag, max, trx).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import MachineFault, MissingFile, PipelineError
from ..files import atomic_path
from . import heads

FORMAT = 3


class CheckpointError(PipelineError):
    pass


@dataclass
class Checkpoint:
    head: str
    head_options: dict
    train_config: dict
    cache: dict                      # path, settings, settings_hash, provenance
    state_dict: dict
    episode: int = 0
    best_val: float = float("nan")
    head_file: dict | None = None    # path, sha256 of a user's head file
    resume: dict | None = None       # last.pt: optimizer, scheduler, rng, torch_rng, curve
    format: int = FORMAT

    @property
    def feature_size(self) -> int:
        """D of the features the head was built for (checkpoints before format 3: MFNet's 768)."""
        return self.cache.get("feature_size", 768)

    def build_head(self, head_file: str | None = None) -> heads.Head:
        """The trained head, in eval mode. A head from a user's file is imported from the recorded
        path (or `head_file`), which must still have the recorded sha256."""
        if self.head_file is not None:
            path = head_file or self.head_file["path"]
            if not Path(path).is_file():
                raise MissingFile(f"head {self.head!r} was trained from {self.head_file['path']}, which does not exist "
                                  "now; pass --head-file with its new place")
            got = heads.load_head_file(path)
            if got["sha256"] != self.head_file["sha256"]:
                raise CheckpointError(f"{path} has changed since head {self.head!r} was trained from it (sha256 "
                                      f"{got['sha256'][:12]}... vs {self.head_file['sha256'][:12]}... recorded)")
        head = heads.build(self.head, self.head_options, self.feature_size)
        head.load_state_dict(self.state_dict)
        return head.eval()


def save(path, ck: Checkpoint) -> None:
    with atomic_path(path) as tmp:
        try:
            torch.save(asdict(ck), tmp)
        except RuntimeError as e:    # torch's writer reports a full disk as a RuntimeError, not an OSError
            raise MachineFault(f"{path}: the checkpoint could not be written ({str(e).splitlines()[0]}); "
                               "check the free space and permissions of its folder") from None


def load(path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"checkpoint {path} does not exist (run `pipeline train`)")
    try:
        d = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:  # pickle or zip errors: say which file
        raise CheckpointError(f"{path}: not a checkpoint that torch can read ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict) or "head" not in d or "state_dict" not in d:
        raise CheckpointError(f"{path} is not a checkpoint written by `pipeline train`")
    version = d.get("format", 1)
    if version > FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {version}; this version of the toolkit reads up to "
                              f"{FORMAT}: upgrade it (pip install -U, or git pull and make install)")
    if version == 1:
        d = _from_format_1(d)
    if version <= 2:
        d = _from_format_2(d)
    known = {f for f in Checkpoint.__dataclass_fields__}
    return Checkpoint(**{k: v for k, v in d.items() if k in known})


def _from_format_1(d: dict) -> dict:
    """Format 1 kept the LSTM's size as head_config {"hidden": ...} and in the training config, and
    the resume state at the top level."""
    cfg = dict(d["train_config"])
    cfg.pop("hidden", None)
    cfg["head_options"] = dict(d.get("head_config", {}))
    resume = {k: d[k] for k in ("optimizer", "scheduler", "rng", "torch_rng", "curve") if k in d} or None
    return dict(head=d["head"], head_options=dict(d.get("head_config", {})), train_config=cfg, cache=d["cache"],
                state_dict=d["state_dict"], episode=d.get("episode", 0), best_val=d.get("best_val", float("nan")),
                resume=resume, format=1)


PLAIN = dict(projection=0, weight=1.0, learn_weight=False, temperature=1.0)


def _from_format_2(d: dict) -> dict:
    """Format 2's chamfer matched consecutive tuples jointly with a learnt log-scale (`proj`, `norm`,
    `log_scale`); its diag and max were parameter-free; its trx had no dropout. Their options are
    spelled out so that the same computation is built."""
    opts, state = dict(d["head_options"]), dict(d["state_dict"])
    if d["head"] == "chamfer":
        scale, learn = opts.pop("scale", 1.0), opts.pop("learn_scale", True)
        opts.update(projection=opts.pop("dim", 1024), tuple_length=opts.get("tuple_length", 2), tuples="consecutive",
                    joint=True, weight=scale, learn_weight=learn, temperature=1.0)
        renamed = {"proj.": "fc.", "norm.": "layer_norm."}
        state = {next((new + k[len(old):] for old, new in renamed.items() if k.startswith(old)), k): v
                 for k, v in state.items() if k != "log_scale"}
        if learn:
            state["weight"] = d["state_dict"]["log_scale"].exp()
    elif d["head"] in ("diag", "max"):
        opts.update(PLAIN)
    elif d["head"] == "trx":
        opts.update(dropout=0.0)
    cfg = dict(d["train_config"], head_options=opts)
    return dict(d, head_options=opts, state_dict=state, train_config=cfg)


def describe(path, ck: Checkpoint) -> str:
    cfg = ck.train_config
    n_params = sum(t.numel() for t in ck.state_dict.values())
    options = heads.format_options(ck.head_options) or "none"
    lines = [f"checkpoint {path} (format {ck.format}): head {ck.head} ({n_params} parameter values), "
             f"options {options}, loss {cfg['loss']}"]
    if ck.head_file:
        lines.append(f"head file {ck.head_file['path']} (sha256 {ck.head_file['sha256'][:16]}...)")
    lines += [f"best validation accuracy {100 * ck.best_val:.2f}% at episode {ck.episode}",
              "training: " + ", ".join(f"{k}={v}" for k, v in sorted(cfg.items())),
              f"trained on cache {ck.cache['path']} (settings hash {ck.cache['settings_hash']})",
              "cache settings: " + json.dumps(ck.cache["settings"], sort_keys=True)]
    for part, ids in (ck.cache.get("dropped") or {}).items():
        lines.append(f"left out of {part} for non-finite features (--drop-nonfinite): {len(ids)} video(s): "
                     f"{', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''}")
    return "\n".join(lines)
