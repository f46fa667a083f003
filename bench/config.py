"""Typed configurations: a phase's options are a frozen dataclass; its fields become the phase's flags
(`--field-name`, typed by the annotation, help from the field's metadata). One definition, no
environment knobs."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any


def option(default: Any, help: str, **kw) -> Any:
    """A configuration field with its help text."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for a sequence default (configurations are frozen)")
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the dataclass `cls`: bool fields are --x/--no-x, tuples take several values,
    Optional[...] fields default to None."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, optional = _base_type(hints[f.name])
        help_ = f.metadata.get("help", "") + (f" (default: {f.default})" if f.default not in (None, (), "") else "")
        if kind is bool:
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_)
        elif typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            parser.add_argument(_flag(f.name), dest=f.name, type=item, nargs="+", default=f.default, help=help_)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, type=kind, default=f.default, help=help_,
                                choices=f.metadata.get("choices"))


def from_args(cls: type, ns: argparse.Namespace):
    """The dataclass `cls` from parsed flags (tuples from lists)."""
    values = {}
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name)
        values[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**values)


def _base_type(t) -> tuple[type, bool]:
    """(the type a flag parses, whether None is allowed) for an annotation such as `int | None`."""
    args = typing.get_args(t)
    if typing.get_origin(t) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return t, False
