"""The stage scripts' flags -> config, with errors that name the flag (autoencoder.py, diffusion/train.py,
diffusion/sample.py, sds/main.py).

A config dataclass checks its values by field name ("lr must be > 0.0; got -1.0"); a user typed `--lr`. Standard
library only, like voxdiff/cli.py.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from voxdiff.cli import Flag, config_from_args
from voxdiff.errors import VoxdiffError


def name_flags(message: str, args: argparse.Namespace, flags: list[Flag]) -> str:
    """`message` prefixed by the flags the user gave whose field it mentions (`--lr: lr must be > 0.0; got -1.0`,
    `--resolution: AE resolution must be ...`); unchanged when it already names a flag or mentions none given."""
    words = set(re.findall(r"[A-Za-z_]\w*", message))
    options = list(dict.fromkeys(fl.option for fl in flags if hasattr(args, fl.dest) and fl.field in words))
    if not options or any(o in message for o in options):
        return message
    return f"{', '.join(options)}: {message}"


def config_from_flags(cls: type, args: argparse.Namespace, flags: list[Flag], base: Any = None) -> Any:
    """`config_from_args`, checked in full before anything runs: a bad value is one VoxdiffError line that names the
    flag. Seeds must be >= 0 (numpy's seed sequences refuse negative ones, and only after files were written)."""
    try:
        cfg = config_from_args(cls, args, flags, base)
    except ValueError as e:
        raise VoxdiffError(name_flags(str(e).splitlines()[0] if str(e) else type(e).__name__, args, flags)) from None
    if getattr(cfg, "seed", 0) < 0:
        raise VoxdiffError(f"--seed must be >= 0; got {cfg.seed}")
    return cfg
