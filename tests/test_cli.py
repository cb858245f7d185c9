"""The command lines are generated from the config dataclasses: every field is a flag, one name per idea across
scripts, defaults shown in --help, values validated before any work."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest
from helpers import ROOT

from voxdiff import config
from voxdiff.cli import add_config_arguments, config_from_args, load_script
from voxdiff.config import (
    CATEGORIES,
    AETrainConfig,
    LDMTrainConfig,
    RunConfig,
    SampleConfig,
    SDSConfig,
    TuneConfig,
    from_dict,
    tagged_fields,
    to_dict,
)
from voxdiff.presets import run_preset

STAGE_SCRIPTS = {"autoencoder.py": AETrainConfig, "diffusion/train.py": LDMTrainConfig,
                 "diffusion/sample.py": SampleConfig, "sds/main.py": SDSConfig}
ALL_SCRIPTS = [*STAGE_SCRIPTS, "load_data.py", "eval.py", "visualize.py", "bench/tune_sampling.py"]
# Names the project used for ideas that now have one name each (left: retired, right: the one name).
RETIRED = {"--guidance_scale": "--cfg_scale", "--max_steps": "--num_steps", "--num_workers": "--workers",
           "--data_dir": "--dataset_path", "--hdf5_dir": "--dataset_path", "--ae_minutes": "--ae.max_minutes",
           "--ldm_minutes": "--ldm.max_minutes", "--init_steps": "--steps", "--categories": "--category",
           "--sample_every": "--preview_every", "--calib_fraction": "--holdout_fraction"}
CONFIGS = [c for c in vars(config).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]
TAGS = ("derived", "from_run", "local", "switch", "added", "preview")


def leaf_fields(cls: type, path: str = "") -> list[str]:
    """Dotted names of every settable field (nested configs flattened), minus the derived ones."""
    out: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaf_fields(hints[f.name], f"{path}{f.name}.")
        elif not f.metadata.get("derived"):
            out.append(f"{path}{f.name}")
    return out


def _flag(field: str, prefix: str = "") -> str:
    leaf = field.split(".")[-1]
    return f"--{prefix}{'category' if leaf == 'categories' else leaf}"


def _parser(script: str) -> argparse.ArgumentParser:
    module = load_script(ROOT / script)
    built = module.build_parser()
    return built[0] if isinstance(built, tuple) else built


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


@pytest.mark.parametrize("script", list(STAGE_SCRIPTS))
def test_every_config_field_is_a_flag_of_its_script(script: str) -> None:
    options = _options(_parser(script))
    missing = [f for f in leaf_fields(STAGE_SCRIPTS[script]) if _flag(f) not in options]
    assert not missing, f"{script} cannot set {missing}"


def test_the_pipeline_reaches_every_stage_setting() -> None:
    from voxdiff.__main__ import build_parser

    options = _options(build_parser()[0])
    # what the runner fills in itself (config metadata "from_run"), as the runner listed it by hand before (the tune
    # stage's seed is its own: another stream than the samples')
    set_by_pipeline = {"dataset_path", "ckpt_path", "ae_ckpt_path", "ldm_ckpt_path", "save_dir", "device", "seed",
                       "resume", "overwrite", "resolution", "render", "threads", "preview_threshold"}
    for prefix, cls in (("ae.", AETrainConfig), ("ldm.", LDMTrainConfig), ("tune.", TuneConfig),
                        ("sample.", SampleConfig)):
        run_owned = set(tagged_fields(cls, "from_run"))
        names = {f.name for f in dataclasses.fields(cls)}
        assert run_owned == (set() if cls is TuneConfig else set_by_pipeline & names), cls.__name__
        switch = tagged_fields(cls, "switch")  # --tune, not --tune.enabled
        flag = {f: f"--{prefix[:-1]}" if f in switch else _flag(f, prefix) for f in leaf_fields(cls)}
        missing = [f for f in leaf_fields(cls) if f not in set_by_pipeline and flag[f] not in options]
        assert not missing, f"python -m voxdiff cannot set {prefix}{missing}"
        assert not [f for f in run_owned if flag[f] in options]  # and has no flag for those
    for f in leaf_fields(RunConfig):
        if f.split(".")[0] not in ("ae", "ldm", "tune", "sample", "name"):
            assert _flag(f) in options, f


def test_every_config_field_has_help_and_keeps_its_tags() -> None:
    """--help reads field metadata only: every field of every config dataclass has a help text, and a subclass that
    redefines a field (a new default) keeps the base's tags, so the runner treats it alike."""
    assert len(CONFIGS) >= 12
    for cls in CONFIGS:
        for f in dataclasses.fields(cls):
            assert isinstance(f.metadata.get("help"), str) and f.metadata["help"].strip(), f"{cls.__name__}.{f.name}"
            assert set(f.metadata) <= {"help", *TAGS}, f"{cls.__name__}.{f.name}"
            for base in cls.__mro__[1:]:
                inherited = {g.name: g for g in dataclasses.fields(base)} if dataclasses.is_dataclass(base) else {}
                if f.name in inherited:
                    tags = {t: inherited[f.name].metadata.get(t) for t in TAGS}
                    assert {t: f.metadata.get(t) for t in TAGS} == tags, f"{cls.__name__}.{f.name}"


def test_help_comes_from_the_metadata_and_switches_read_as_words() -> None:
    from voxdiff.__main__ import build_parser

    parser, flags = build_parser()
    by_option = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    lr_help = next(f for f in dataclasses.fields(LDMTrainConfig) if f.name == "lr").metadata["help"]
    assert by_option["--ldm.lr"].help.startswith(lr_help)
    assert "--tune" in by_option and "--tune.enabled" not in by_option and "--tune.no_enabled" not in by_option
    assert by_option["--tune"].dest == "tune.enabled"
    for argv, on in ((["--tune"], True), (["--no_tune"], False)):
        cfg = config_from_args(RunConfig, parser.parse_args(argv), flags, run_preset("demo"))
        assert cfg.tune.enabled is on
    # derived fields are never flags: the AE sets the U-Net's input width, CATEGORIES its class count
    assert not {"--ldm.in_channels", "--ldm.num_classes"} & set(by_option)
    assert not {"--in_channels", "--num_classes"} & _options(_parser("diffusion/train.py"))


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_one_name_per_idea_and_defaults_in_help(script: str) -> None:
    parser = _parser(script)
    options = _options(parser)
    assert not options & set(RETIRED), f"{script} still uses {sorted(options & set(RETIRED))}"
    assert "--preset" not in options  # only the pipeline's presets are called --preset
    text = parser.format_help()
    documented = [a for a in parser._actions if a.option_strings and a.help not in (None, argparse.SUPPRESS)
                  and a.dest != "help"]
    assert text.count("default") >= len(documented), f"{script}: some flags hide their default"


def test_shared_seed_names_are_kept() -> None:
    assert {"--dataset_path", "--ckpt_path"} <= _options(_parser("autoencoder.py"))
    assert {"--dataset_path", "--ckpt_path", "--ae_ckpt_path", "--use_cfg"} <= _options(_parser("diffusion/train.py"))
    for script in ("diffusion/sample.py", "sds/main.py"):
        assert {"--ldm_ckpt_path", "--ae_ckpt_path", "--save_dir", "--use_cfg", "--cfg_scale",
                "--category"} <= _options(_parser(script))


def test_flags_round_trip_into_the_config() -> None:
    parser = argparse.ArgumentParser()
    flags = add_config_arguments(parser, SampleConfig)
    args = parser.parse_args(["--category", "all", "--steps", "none", "--cfg_scale", "2.5", "--no_use_ema",
                              "--binarize", "topk", "--topk", "300"])
    cfg = config_from_args(SampleConfig, args, flags)
    assert cfg.categories == CATEGORIES and cfg.steps is None and cfg.cfg_scale == 2.5 and not cfg.use_ema
    assert cfg.topk == 300 and cfg == from_dict(SampleConfig, to_dict(cfg))
    untouched = config_from_args(SampleConfig, parser.parse_args([]), flags)
    assert untouched == SampleConfig()


@pytest.mark.parametrize(("argv", "match"), [
    (["--batch_size", "0"], "batch_size must be >= 1"),
    (["--lr", "inf"], "finite"),
    (["--ckpt_every", "0"], "ckpt_every must be >= 1"),
    (["--holdout_fraction", "1.5"], "holdout_fraction must be < 1.0"),
    (["--num_steps", "0"], "num_steps must be >= 1"),
    (["--resume", "--overwrite"], "resume and overwrite exclude each other"),
])
def test_bad_numbers_are_refused_before_any_work(argv: list[str], match: str,
                                                 capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    flags = add_config_arguments(parser, AETrainConfig)
    with pytest.raises((ValueError, SystemExit)) as err:
        config_from_args(AETrainConfig, parser.parse_args(argv), flags)
    assert match in str(err.value) + capsys.readouterr().err
