"""Config dataclasses (model, training) built from a JSON or TOML table, their values checked against the
fields' annotations first: `"embed_dim": "32"` or `"batch_size": 1.5` is a one-line error naming the
option, not a traceback from deep inside torch."""

from __future__ import annotations

import types
import typing
from dataclasses import fields

from dmrx.errors import DmrxError

_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def from_options(cls, raw, what: str):
    """An instance of dataclass `cls` from `raw`; `what` names the options in messages ("model", "train")."""
    if not isinstance(raw, dict):
        raise DmrxError(f"{what} options must be a table of name = value, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise DmrxError(f"unknown {what} option(s) {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _check(hints[name], value, f"{what} option {name}") for name, value in raw.items()})


def _check(tp, value, label: str):
    """value as type tp (ints accepted for floats, lists for tuples), or a DmrxError naming label."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(inner, value, label)
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)):
            raise DmrxError(f"{label} must be a list, got {value!r}")
        return tuple(_check(args[0], v, f"{label} entry") for v in value)
    # bool is an int in Python, but true is not a size and 1 is not a switch
    ok = isinstance(value, tp) and not isinstance(value, bool) if tp is not bool else isinstance(value, bool)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise DmrxError(f"{label} must be {_NAMES.get(tp, tp.__name__)}, got {value!r}")
    return value
