"""Command-line flags generated from the config dataclasses, and back: one name per setting, written once.

`add_config_arguments(parser, Config)` adds one flag per field (nested model / scheduler configs are flattened): the
type and `Literal` choices come from the annotation, the help from the field's metadata (`metadata={"help": ...}`, as
HfArgumentParser reads it), and the default is shown. Booleans get `--name` / `--no_name` (a config's on/off switch
under a prefix: `--tune` / `--no_tune`); `X | None` fields accept `none`; tuples take several values; `categories`
becomes `--category NAME [NAME ...]` or `--category all`; fields the program derives (metadata "derived") are no flags.
Flags a user did not give keep the config's value, so `config_from_args(Config, args, base)` can apply them over a
preset.

Standard library only, like config.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import sys
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from voxdiff.config import ACTS_ONLY_WITH, CATEGORIES, from_dict, to_dict


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text!r}")
    return value


def probability(text: str) -> float:
    """argparse type: a finite number in [0, 1) (a threshold on occupancy probabilities)."""
    value = _finite_float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1); got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (counts, seeds)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0; got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (timeouts, scales)."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0; got {text!r}")
    return value


def output_file(text: str) -> str:
    """argparse type: a file path that can be written (not a directory; its directory exists or can be made)."""
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
    if any(q.exists() and not q.is_dir() for q in p.parents):
        raise argparse.ArgumentTypeError(f"{text}: a parent of it is a file, not a directory")
    return text


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_optional(text: str) -> Any:
        return None if text.lower() == "none" else parse(text)

    parse_optional.__name__ = parse.__name__
    return parse_optional


_PARSERS: dict[Any, Callable[[str], Any]] = {int: _int, float: _finite_float, str: str}


@dataclasses.dataclass
class Flag:
    """One generated option: its dest (dotted path into the config) and how it was declared."""

    dest: str
    option: str
    field: str


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _fmt(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return str(value)


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    defaults: Any = None,
    *,
    prefix: str = "",
    skip: Iterable[str] = (),
    default_note: str | None = None,
) -> list[Flag]:
    """Add a flag for every field of the config dataclass `cls` (nested configs flattened); returns the flags.

    `defaults` (an instance) supplies the values shown in --help; `prefix` ("ae." ...) namespaces the options of one
    sub-config of a larger config; `skip` names fields that are not flags (dotted for nested ones: "model.resolution"),
    besides the derived ones; `default_note` replaces the shown default.
    """
    defaults = defaults if defaults is not None else cls()
    flags: list[Flag] = []
    _add(parser, cls, defaults, prefix, "", set(skip), default_note, flags)
    return flags


def _add(parser: Any, cls: type, defaults: Any, prefix: str, path: str, skip: set[str], note: str | None,
         flags: list[Flag]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f"{path}{f.name}" in skip or f.metadata.get("derived"):
            continue
        tp = hints[f.name]
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):  # model / scheduler settings: flattened into the same namespace
            _add(parser, tp, value, prefix, f"{path}{f.name}.", skip, note, flags)
            continue
        base, optional = _unwrap_optional(tp)
        name = "category" if f.name == "categories" else f.name
        option, off, dest = f"--{prefix}{name}", f"--{prefix}no_{name}", f"{prefix}{path}{f.name}"
        if base is bool and prefix and f.metadata.get("switch"):  # the config's on/off switch: --tune / --no_tune
            option, off = f"--{prefix.rstrip('.')}", f"--no_{prefix.rstrip('.')}"
        shown = note or f"default: {_fmt(value) if f.name != 'categories' or tuple(value) != CATEGORIES else 'all'}"
        text = f"{f.metadata.get('help', '')} ({shown})".strip()
        kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if base is bool:
            if value is True:
                kw["help"] = kw["help"][:-1] + f"; {off} turns it off)"
            parser.add_argument(option, action="store_true", **kw)
            parser.add_argument(off, action="store_false", dest=dest, default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
        elif f.name == "categories":
            parser.add_argument(option, nargs="+", choices=[*CATEGORIES, "all"], metavar="CATEGORY", **kw)
        elif get_origin(base) is tuple:
            parser.add_argument(option, nargs="+", type=_PARSERS[get_args(base)[0]], metavar="V", **kw)
        elif get_origin(base) is Literal:
            parser.add_argument(option, choices=list(get_args(base)), **kw)
        else:
            parse = _PARSERS[base]
            meta = name.upper() if base is str else base.__name__.upper()
            parser.add_argument(option, type=_optional(parse) if optional else parse,
                                metavar=meta + ("|none" if optional else ""), **kw)
        flags.append(Flag(dest, option, f.name))


def given(args: argparse.Namespace, flags: list[Flag]) -> dict[str, Any]:
    """The flags the user gave, as {dest: value}."""
    return {fl.dest: getattr(args, fl.dest) for fl in flags if hasattr(args, fl.dest)}


def config_from_args(cls: type, args: argparse.Namespace, flags: list[Flag], base: Any = None,
                     prefix: str = "") -> Any:
    """`base` (default `cls()`) with the given flags applied, validated by the dataclass (ValueError on bad values).

    Refuses a flag that acts only together with another setting's value when that setting says otherwise
    (config.ACTS_ONLY_WITH: e.g. --topk without --binarize topk), instead of silently ignoring it.
    """
    data = to_dict(base if base is not None else cls())
    values = {d[len(prefix) :]: v for d, v in given(args, flags).items() if d.startswith(prefix)}
    for dest, value in values.items():
        *parents, leaf = dest.split(".")
        node = data
        for p in parents:
            node = node[p]
        if leaf == "categories":
            value = list(CATEGORIES) if "all" in value else list(dict.fromkeys(value))
        node[leaf] = list(value) if isinstance(value, tuple) else value
    for dest in values:
        leaf = dest.split(".")[-1]
        if leaf in ACTS_ONLY_WITH:
            other, needed = ACTS_ONLY_WITH[leaf]
            node = data
            for p in dest.split(".")[:-1]:
                node = node[p]
            if other in node and node[other] != needed:
                opt = f"--{prefix}{leaf}"
                want = f"--{prefix}{other} {needed}" if not isinstance(needed, bool) else f"--{prefix}{other}"
                raise ValueError(f"{opt} acts only with {want}; drop one of them")
    return from_dict(cls, data)


def load_script(path: str | Path) -> Any:
    """Import a top-level script (e.g. diffusion/train.py) as a module, for tests and tools that inspect its parser."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"_voxdiff_script_{path.stem}_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`prog: error: ...`, exit 2), like every other error of the CLIs."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's line breaks in the description (generated flags write their own defaults)."""


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """For hand-written flags: the module docstring as written, and every default shown."""
