"""Heads: the registry, the one protocol every head follows, and head options.

A new head is one file in this package (or in a file of your own, `--head-file`) with one
`@register("name")` line. Every head is a `Head` and answers one question, the scores of an
episode's queries against its classes:

    consumes                  what it reads per video from the cache: "pooled" (T, D) clip
                              vectors, or "maps" the clip-mean map (D, t, h, w); D, the feature
                              size, is the cache's and is given to the head when it is built
    kind                      what its scores are: "cosine" (bounded in [-1, 1]), "probability"
                              (in [0, 1]) or "logits" (unbounded: scaled similarities, minus
                              distances)
    loss                      the loss its paper trains it with; `train` uses it unless told
                              otherwise, and refuses a loss that cannot work on `kind`
    clips                     the sequence length T a pooled head reads: its option `clips`, or
                              None (no such option) for the cache's own T
    view                      the cache view read: `consumes`, or "steps" when the head's option
                              `per_step` is set: each clip's t temporal positions in a row, (T * t, D)
    encode(x)                 per-video work, (B, ...) -> (B, ...); evaluation and predict run it once
                              per video, training once per episode video
    as_query(z)               optional further per-video work on a query's encoding (default: none);
                              evaluation runs it once per video, not once per episode
    scores(support, queries)  encoded support (N, K, ...) and queries (M, ...), the latter through
                              as_query -> (M, N), higher is more alike. A class's column may depend
                              only on that class's support: predict scores classes with different K
                              one at a time.
    batched                   True when `scores` also takes a leading episode dimension,
                              (E, N, K, ...), (E, M, ...) -> (E, M, N): evaluation then scores
                              hundreds of episodes per call instead of one.

`EmbeddingHead` is the shared default for heads that turn a video into a vector: the class
prototype is the mean of its K vectors, the score the cosine to it (the paper's rule).

Options: a head declares a dataclass `Options` with `option(default, help)` fields; they are
set with `--head-opt key=value` or `head_options:` in params.yaml, checked against the declared
types and ranges when the head is built, and stored in checkpoints.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import math
import pkgutil
import sys
import typing
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, MissingFile
from ...files import sha256

HEADS: dict[str, type] = {}
CONSUMES = ("pooled", "maps")
KINDS = ("cosine", "probability", "logits")


def option(default, help: str, choices: tuple | None = None, low=None, above=None, below=None):
    """A head option: its default, one line of help, and optionally the allowed values: `choices`,
    or a range (`low` <= value, `above` < value, value < `below`; for a tuple, each item)."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices, low=low, above=above,
                                                            below=below))


class Head(nn.Module):
    consumes = "pooled"
    batched = False
    kind = "cosine"
    loss = "circle"

    @dataclasses.dataclass
    class Options:
        pass

    def __init__(self, options=None, in_dim: int | None = None):
        super().__init__()
        self.options = options if options is not None else self.Options()
        self.in_dim = in_dim          # the cache's feature size D

    @classmethod
    def scoring(cls, options) -> tuple[str, str]:
        """(what its scores are, the loss its paper trains it with) under `options`."""
        return cls.kind, cls.loss

    @property
    def clips(self) -> int | None:
        return getattr(self.options, "clips", None)

    @property
    def view(self) -> str:
        return view_of(type(self), self.options)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def as_query(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def scores(self, support: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"head {type(self).__name__} must define scores(support, queries)")

    def forward(self, support: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Raw support (N, K, ...) and queries (M, ...) -> scores (M, N)."""
        n, k = support.shape[:2]
        z = self.encode(torch.cat([support.flatten(0, 1), queries]))
        return self.scores(z[:n * k].unflatten(0, (n, k)), self.as_query(z[n * k:]))


class EmbeddingHead(Head):
    """A vector per video; prototype = mean of the K support vectors; score = cosine."""

    batched = True

    def as_query(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=-1)         # a query's direction, once per video

    def scores(self, support: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """support (..., N, K, D) vectors, queries (..., M, D) unit vectors -> (..., M, N) cosines."""
        return queries @ prototypes(support).transpose(-1, -2)


def prototypes(support: torch.Tensor) -> torch.Tensor:
    """(..., N, K, D) support video vectors -> (..., N, D) unit class prototypes: the mean of the
    K vectors (the paper's K-shot rule), normalised for cosine scoring."""
    return F.normalize(support.mean(-2), dim=-1)


def register(name: str):
    def wrap(cls):
        if not (isinstance(cls, type) and issubclass(cls, Head)):
            raise ConfigError(f"@register({name!r}): {cls!r} is not a subclass of pipeline.fewshot.heads.Head")
        if cls.consumes not in CONSUMES:
            raise ConfigError(f"head {name!r}: consumes must be one of {CONSUMES}, got {cls.consumes!r}")
        if cls.kind not in KINDS:
            raise ConfigError(f"head {name!r}: kind must be one of {KINDS}, got {cls.kind!r}")
        if "in_dim" not in inspect.signature(cls.__init__).parameters:
            raise ConfigError(f"head {name!r} in {inspect.getsourcefile(cls)}: __init__ must take (options, in_dim), "
                              "in_dim being the cache's feature size (this toolkit passes it since checkpoint "
                              "format 3; see docs/heads.md, 'Write your own head')")
        old = HEADS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ConfigError(f"head {name!r} from {cls.__module__} is already registered by {old.__module__}")
        HEADS[name] = cls
        cls.registered_name = name
        return cls
    return wrap


def get(name: str) -> type:
    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r} (known: {', '.join(sorted(HEADS))}; a head of your own: "
                          "--head-file FILE)")
    return HEADS[name]


def build(name: str, options: dict | None, in_dim: int) -> Head:
    """Head `name` with `options` for features of size `in_dim` (the cache's)."""
    cls = get(name)
    return cls(parse_options(cls, options or {}), in_dim=in_dim)


def view_of(cls, options) -> str:
    """The cache view a head of class `cls` with `options` reads (known before it is built, since the
    view decides which features are loaded and so the feature size it is built with)."""
    return "steps" if getattr(options, "per_step", False) else cls.consumes


def option_fields(cls) -> list[tuple[str, object, object, dict]]:
    """(name, type, default, metadata) of each option of head class `cls`."""
    hints = typing.get_type_hints(cls.Options)
    return [(f.name, hints[f.name], f.default, f.metadata) for f in dataclasses.fields(cls.Options)]


def describe_options(cls) -> str:
    fields = option_fields(cls)
    if not fields:
        return "no options"
    return "; ".join(f"{n} ({type_name(t)}, default {show(d)}): {m.get('help', '')}"
                     + (f" [{'|'.join(map(str, m['choices']))}]" if m.get("choices") else "")
                     + (f" [{valid_range(m)}]" if valid_range(m) else "")
                     for n, t, d, m in fields)


def valid_range(meta: dict) -> str:
    """"1 <= x", "0 < x < 1", ...: an option's declared range, or ""."""
    lo = f"{meta['low']} <= " if meta.get("low") is not None else f"{meta['above']} < " if meta.get("above") is not None else ""
    hi = f" < {meta['below']}" if meta.get("below") is not None else ""
    return f"{lo}x{hi}" if lo or hi else ""


def _in_range(value, meta: dict) -> bool:
    items = value if isinstance(value, tuple) else (value,)
    if isinstance(value, tuple) and (meta.get("low"), meta.get("above"), meta.get("below")) != (None,) * 3 and not items:
        return False
    return all((meta.get("low") is None or v >= meta["low"]) and (meta.get("above") is None or v > meta["above"])
               and (meta.get("below") is None or v < meta["below"]) and math.isfinite(v) for v in items
               if not isinstance(v, (str, bool)))


def parse_options(cls, given: dict):
    """`given` (strings from the CLI or YAML values) -> the head's Options, checked; errors name the
    head's options."""
    if isinstance(given, cls.Options):
        return given
    fields = {n: (t, m) for n, t, _, m in option_fields(cls)}
    name = getattr(cls, "registered_name", cls.__name__)
    values = {}
    for key, raw in given.items():
        if key not in fields:
            raise ConfigError(f"head {name}: unknown option {key!r}; its options: {describe_options(cls)}")
        typ, meta = fields[key]
        try:
            value = _coerce(raw, typ)
        except (TypeError, ValueError):
            raise ConfigError(f"head {name}: option {key}={raw!r} is not a valid {type_name(typ)}; its options: "
                              f"{describe_options(cls)}") from None
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"head {name}: option {key}={raw!r} is not one of {', '.join(map(str, meta['choices']))}")
        if not _in_range(value, meta):
            what = "each of " if isinstance(value, tuple) else ""
            raise ConfigError(f"head {name}: option {key}={show(raw)} is out of range: {what}{key} must satisfy "
                              f"{valid_range(meta)}" + (" (and give at least one)" if isinstance(value, tuple) else ""))
        values[key] = value
    try:
        return cls.Options(**values)
    except ConfigError as e:        # a rule between options (Options.__post_init__)
        raise ConfigError(f"head {name}: {e}") from None


def format_options(options: dict) -> str:
    """{"hidden": 512, "clips": 3} -> "hidden=512 clips=3", as tables and `pipeline info` show them."""
    return " ".join(f"{k}={show(v)}" for k, v in options.items())


def changed_options(head: str, options: dict) -> dict:
    """The options that differ from head `head`'s defaults (all of them for a head not registered
    here, e.g. one from a user's file that is not loaded): what a results table needs to tell runs apart."""
    if head not in HEADS:
        return dict(options)
    defaults = {n: d for n, _, d, _ in option_fields(HEADS[head])}
    return {k: v for k, v in options.items() if k not in defaults or show(v) != show(defaults[k])}


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """["key=value", ...] from the command line -> {key: value}."""
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--head-opt {p!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def _coerce(raw, typ):
    if typing.get_origin(typ) is tuple:
        inner = typing.get_args(typ)[0]
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        return tuple(_coerce(i, inner) for i in items if not (isinstance(i, str) and not i.strip()))
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower()
        if word not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(raw)
        return word in ("true", "1", "yes")
    if typ is int:
        if isinstance(raw, float) or isinstance(raw, bool):
            raise TypeError(raw)
        return int(str(raw).strip())
    if typ is float:
        if isinstance(raw, bool):
            raise TypeError(raw)
        return float(raw)
    if typ is str:
        return str(raw)
    raise TypeError(f"unsupported option type {typ}")


def type_name(t) -> str:
    if typing.get_origin(t) is tuple:
        return f"comma-separated {typing.get_args(t)[0].__name__}s"
    return getattr(t, "__name__", str(t))


def show(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def load_head_file(path) -> dict:
    """Imports a user's file of heads (its `@register` lines add them) and returns what a
    checkpoint records of it: the resolved path and the sha256 of its bytes."""
    path = Path(path).resolve()
    if not path.is_file():
        raise MissingFile(f"head file {path} does not exist")
    digest = sha256(path)
    module = f"pipeline_user_heads_{digest[:16]}"
    if module not in sys.modules:
        spec = importlib.util.spec_from_file_location(module, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[module] = mod
        try:
            spec.loader.exec_module(mod)
        except ConfigError:
            del sys.modules[module]
            raise
        except Exception as e:
            del sys.modules[module]
            raise ConfigError(f"head file {path}: importing it failed: {type(e).__name__}: {e}") from e
    return dict(path=str(path), sha256=digest)


for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
