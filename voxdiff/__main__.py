"""The main job from the command line: `python -m voxdiff --preset demo` runs data -> AE -> LDM -> tune -> sample ->
eval -> render -> report (the stage runner, voxdiff.runner) and prints one line per category and set.

Every setting of every stage is a flag, named as in the stage's own script and prefixed by the stage (--ae.num_steps,
--ldm.lr, --sample.cfg_scale, ...; --tune / --no_tune turn the tune stage on or off), except those the runner fills in
from the run's own settings (--run_dir, --device, --seed, ...); a flag that is not given keeps the preset's value.
--config reruns a run's config.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from voxdiff.cli import ArgumentParser, HelpFormatter, add_config_arguments, config_from_args
from voxdiff.config import (
    AETrainConfig,
    LDMTrainConfig,
    RunConfig,
    SampleConfig,
    TuneConfig,
    from_dict,
    tagged_fields,
)
from voxdiff.errors import VoxdiffError, run_cli
from voxdiff.presets import RUN_PRESETS, run_preset
from voxdiff.report import summary_lines
from voxdiff.runner import RERUNNABLE, STAGES, resolve, run


def build_parser() -> tuple[argparse.ArgumentParser, list]:
    p = ArgumentParser(prog="python -m voxdiff", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=list(RUN_PRESETS), default="demo",
                   help="named configuration of every stage (voxdiff/presets.py) (default: %(default)s)")
    p.add_argument("--config", help="a config.json written by an earlier run (instead of --preset) (default: none)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated subset of the stages (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="rerun every stage, replacing earlier results")
    p.add_argument("--rerun_from", choices=RERUNNABLE, default=None,
                   help="redo this stage and the later ones, keeping the data and the trained models (default: none)")
    note = "default: the preset's"
    flags = add_config_arguments(p, RunConfig, skip=("ae", "ldm", "tune", "sample", "name"), default_note=note)
    for title, cls, prefix in (("AE training (autoencoder.py)", AETrainConfig, "ae."),
                               ("LDM training (diffusion/train.py)", LDMTrainConfig, "ldm."),
                               ("tuning on held-out training shapes (voxdiff/tuning.py)", TuneConfig, "tune."),
                               ("sampling (diffusion/sample.py)", SampleConfig, "sample.")):
        # the fields the runner fills in from the run's own settings (config metadata "from_run") are no flags here
        flags += add_config_arguments(p.add_argument_group(title), cls, prefix=prefix,
                                      skip=tagged_fields(cls, "from_run"), default_note=note)
    return p, flags


def _load_config(path: Path) -> RunConfig:
    """A config.json written by an earlier run, checked in full (nested stage configs included); a VoxdiffError
    naming the file otherwise."""
    if not path.is_file():
        raise VoxdiffError(f"config file not found: {path}")
    try:
        cfg = from_dict(RunConfig, json.loads(path.read_text()))
        _check_types(cfg)
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VoxdiffError(f"{path} is not a voxdiff config ({why})") from None
    return cfg


def _check_types(cfg: Any, where: str = "") -> None:
    """Every field typed as a config dataclass holds one (from_dict keeps a JSON value such as `"ae": 5` as it is)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        tp, value = hints[f.name], getattr(cfg, f.name)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, tp):
                raise TypeError(f"{where}{f.name} must be a {tp.__name__} object; got {value!r}")
            _check_types(value, f"{where}{f.name}.")


def _name_flag(message: str, args: argparse.Namespace, flags: list) -> str:
    """A stage config's "num_steps must be >= 1" names the field only; prefix the flag the user gave for it
    (`--ae.num_steps`) when exactly one given flag has that field name."""
    field = message.split(" ", 1)[0]
    options = [fl.option for fl in flags if fl.field == field and hasattr(args, fl.dest)]
    return f"{options[0]}: {message}" if len(options) == 1 else message


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the flags over a preset or a run's config.json, run the stages, print one line per category and set."""
    parser, flags = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        base = _load_config(Path(args.config))
    else:
        base = run_preset(args.preset)
        base.run_dir = f"runs/{args.preset}"
    try:
        cfg = config_from_args(RunConfig, args, flags, base)
        resolve(cfg)  # builds every stage's config from the run's values: checks them all, writes nothing
    except (ValueError, TypeError) as e:
        msg = _name_flag(str(e), args, flags)
        if msg == str(e) and args.config:  # no flag set it: the value came from the file
            msg = f"{args.config}: {msg}"
        raise VoxdiffError(msg) from None
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise VoxdiffError(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    command = "python -m voxdiff " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(cfg, stages, force=args.force, command=command.strip(), rerun_from=args.rerun_from)
    for line in summary_lines(report, Path(cfg.run_dir)):
        print(line)
    return report


if __name__ == "__main__":
    run_cli(main, prog="python -m voxdiff")
