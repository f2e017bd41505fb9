"""Head registry. A new head is one file in this package and one `@register("name")` line.

An embedding head maps a video to a vector (episode math is shared: prototypes, cosine);
a relation head scores (class support, query) pairs itself. `consumes` says what the trainer
loads from the cache: "pooled" (n, T, 768) clip vectors, or "maps" (n, 768, 8, 4, 4) clip-mean maps.
"""
from __future__ import annotations

import importlib
import pkgutil

HEADS: dict[str, type] = {}


def register(name: str, **defaults):
    def wrap(cls):
        HEADS[name] = cls
        cls.registered_name = name
        cls.defaults = defaults
        return cls
    return wrap


def build(name: str, **config):
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r} (known: {', '.join(sorted(HEADS))})")
    cls = HEADS[name]
    return cls(**{**cls.defaults, **config})


for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
