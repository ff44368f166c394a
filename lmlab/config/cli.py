"""Command lines of the entry points that are not Hydra apps: `key=value` arguments read
into a typed dataclass, and the one-line error exit shared by every entry point.

A `str` field gets the text after the first `=` exactly as the shell passed it: no YAML
reading, so `prompt=ROMEO:`, `prompt="a: b"`, `prompt=123` or `prompt=null` stay the text
typed. Other fields are converted by their annotation (`int`, `float`, `bool`, `list[...]`,
`X | None` with `null`), and a wrong value or an unknown key is a one-line error.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import types
import typing
from collections.abc import Sequence
from typing import NoReturn, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmlab.errors import LmlabError

T = TypeVar("T")
# `key=value` with a plain dotted key; anything else (a path holding `=`) can be positional.
KEY_VALUE = re.compile(r"^\+{0,2}[A-Za-z_][\w.]*=")
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "text"}


def fail(message: str, code: int = 2) -> NoReturn:
    """Prints `error: message` in red to stderr and exits with status `code`."""
    console = Console(stderr=True, soft_wrap=True)
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    sys.exit(code)


def report(metrics: dict[str, float], output_dir, checkpoint: str,
           throughput: dict[str, float] | None = None) -> None:
    """Prints a table of test metrics (and of the training throughput, if measured), where
    the run's files are, and which checkpoint's weights were tested."""
    table = Table(title="test metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(metrics.items()):
        table.add_row(name, f"{value:.4f}")
    if throughput:
        table.add_section()
        for name, value in throughput.items():
            table.add_row(f"throughput/{name}", f"{value:.4g}")
    console = Console()
    console.print(table)
    console.print(f"run files:  {output_dir}", soft_wrap=True)  # one line, to copy whole
    if checkpoint:
        console.print(f"tested:     {checkpoint}", soft_wrap=True)


# How alike (difflib's ratio) a name must be to a typed one to be offered in its place: a
# typo scores above 0.8 (hiden_size: 0.95, embed_dim -> embedding_dim: 0.82), an unrelated
# name that shares a suffix below (hidden_size -> kernel_sizes: 0.61).
SIMILAR = 0.75


def closest(word: str, choices: Sequence[str]) -> str | None:
    """The choice most like `word`, if any is like it enough (`SIMILAR`), else one a single
    slip away (a short name such as `dpp` for `ddp` scores low on the ratio)."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=SIMILAR)
    if close:
        return close[0]
    return next((choice for choice in choices if len(word) >= 3 and one_slip(word, choice)),
                None)


def one_slip(typed: str, name: str) -> bool:
    """Whether `typed` is `name` with one letter wrong, missing or extra, or two neighbours
    swapped."""
    if abs(len(typed) - len(name)) > 1 or typed == name:
        return False
    start = next((i for i, (a, b) in enumerate(zip(typed, name)) if a != b),
                 min(len(typed), len(name)))
    rest_typed, rest_name = typed[start:], name[start:]
    return (rest_typed[1:] == rest_name[1:] or rest_typed[1:] == rest_name
            or rest_typed == rest_name[1:]
            or (rest_typed[:2] == rest_name[1::-1] and rest_typed[2:] == rest_name[2:]))


def did_you_mean(word: str, choices: Sequence[str], prefix: str = "") -> str:
    """` (did you mean 'PREFIXx'?)` for the closest `x` of `choices`, or an empty string."""
    close = closest(word, choices)
    return f" (did you mean {prefix + close!r}?)" if close else ""


def parse_args(schema: type[T], argv: Sequence[str], usage: str,
               positional: Sequence[str] = ()) -> T:
    """Reads `argv` into a `schema` dataclass; every key must be one of its fields.

    Args:
        schema: a dataclass whose fields are the arguments; a field without a default is
            required.
        argv: the command-line arguments, `key=value` after the `positional` ones.
        usage: the usage line, shown after an unknown key or a missing argument.
        positional: fields given by position, in order, before the `key=value` arguments
            (they may also be given as `key=value`).

    Raises:
        LmlabError: an unknown key (with the closest field), a value that does not convert
            to its field's type, a missing required field or a stray argument.
    """
    args, unknown = parse_known_args(schema, argv, usage, positional)
    if unknown:
        raise unknown_key(unknown[0].partition("=")[0], schema, usage)
    return args


def parse_known_args(schema: type[T], argv: Sequence[str], usage: str,
                     positional: Sequence[str] = ()) -> tuple[T, list[str]]:
    """`parse_args`, except that a `key=value` whose key is not a field is returned, in
    order, instead of refused (for an entry point that passes them on). `--help` or `-h`
    anywhere prints the usage, the command's docstring and every argument with its default,
    and exits with status 0, as argparse does."""
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    if "--help" in argv or "-h" in argv:
        rows = []
        for name, f in fields.items():
            default = f.default if f.default_factory is dataclasses.MISSING \
                else f.default_factory()
            shown = ("(required)" if default is dataclasses.MISSING else "null" if default is None
                     else str(default).lower() if isinstance(default, bool)
                     else repr(default) if isinstance(default, str)
                     else f"[{','.join(map(str, default))}]" if isinstance(default, list)
                     else default)
            rows.append(f"  {name}={shown}")
        doc = (sys.modules[schema.__module__].__doc__ or "").strip()
        print(f"usage: {usage}\n\n{doc}\n\narguments, with their defaults:\n" + "\n".join(rows))
        sys.exit(0)
    values, unknown = {}, []
    slots = list(positional)
    for arg in argv:
        if slots and not KEY_VALUE.match(arg):
            values[slots.pop(0)] = arg
            continue
        key, equals, text = arg.partition("=")
        if not equals:
            raise LmlabError(f"expected key=value, got {arg!r}\nusage: {usage}")
        if key in fields:
            values[key] = convert(key, text, hints[key])  # the last one given wins, as in Hydra
        else:
            unknown.append(arg)
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        shown = missing[0].upper() if missing[0] in positional else f"{missing[0]}=..."
        raise LmlabError(f"missing {shown}\nusage: {usage}")
    return schema(**values), unknown


def unknown_key(key: str, schema: type, usage: str) -> LmlabError:
    """The error for a key that is not a field of `schema`."""
    names = [f.name for f in dataclasses.fields(schema)]
    return LmlabError(f"unknown argument {key!r}{did_you_mean(key, names)}\nusage: {usage}")


def convert(key: str, text: str, hint) -> object:
    """`text` as the type `hint` names (`str` is the text itself).

    Raises:
        LmlabError: naming the key, the value and the type expected.
    """
    options = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in options:
        if text == "null":
            return None
        inner = [o for o in options if o is not type(None)]
        return _convert_or_fail(key, text, inner[0], " or null")
    return _convert_or_fail(key, text, hint, "")


def _convert_or_fail(key: str, text: str, hint, suffix: str) -> object:
    try:
        return _convert(text, hint)
    except ValueError:
        expected = NAMES.get(hint, f"a {getattr(hint, '__name__', hint)}")
        if typing.get_origin(hint) is list:
            expected = "a list such as [a,b]"
        raise LmlabError(f"{key}={text!r} is not {expected}{suffix}") from None


def _convert(text: str, hint) -> object:
    if hint is str:
        return text
    if hint is bool:
        if text.lower() not in TRUE + FALSE:
            raise ValueError(text)
        return text.lower() in TRUE
    if hint in (int, float):
        return hint(text)
    if typing.get_origin(hint) is list:
        inner = text.strip()
        if inner.startswith("[") and inner.endswith("]"):
            inner = inner[1:-1]
        (item,) = typing.get_args(hint) or (str,)
        return [_convert(part.strip(), item) for part in inner.split(",") if part.strip()]
    raise TypeError(f"no command-line conversion to {hint}")
