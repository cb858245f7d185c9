r"""Sample shapes from a trained latent DDPM: flags -> SampleConfig -> sample_to_files.

Example:
    python diffusion/sample.py --ldm_ckpt_path checkpoints/ldm --ae_ckpt_path checkpoints/ae --save_dir samples \
        --category all --num_samples 1000 --sampler ddim --steps 50 --cfg_scale 1.0 --resolution 128
Writes {save_dir}/{category}.npy, (N, R, R, R) uint8 in {0, 1} (what eval.py reads), sample.json and sample.log.
An interrupted run continues where it stopped when rerun with the same flags.
Sampling settings (--sampler --steps --eta --cfg_scale --guidance_rescale --clamp_latents --binarize --threshold
--topk) left out take the LDM's stored settings (what its tune stage picked), else the defaults shown; sample.json
records each value used and where it came from ("given", "model" or "default").
Guidance: ε̂ = (1 + w)·ε_cond − w·ε_uncond with w = --cfg_scale, on by default (w = 0 or --no_use_cfg: the plain
conditional model; w = −1: unconditional). w is the "guidance scale" minus one of the other common convention.
Several GPUs: `torchrun --nproc_per_node=K diffusion/sample.py ...` splits the batches over the ranks; the files are
identical to a one-process run with the same --seed.
"""

from __future__ import annotations

import argparse
import json

from voxdiff.checkpoint import SAMPLING_KEYS
from voxdiff.cli import ArgumentParser, HelpFormatter, add_config_arguments, given
from voxdiff.cliflags import config_from_flags
from voxdiff.config import SampleConfig
from voxdiff.errors import run_cli


def build_parser() -> tuple[argparse.ArgumentParser, list]:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    flags = add_config_arguments(p, SampleConfig)
    for action in p._actions:  # a stored setting's flag defaults to the model's value, then to the one shown
        if action.dest in SAMPLING_KEYS and action.help and "(default: " in action.help:
            action.help = action.help.replace("(default: ", "(default: the model's stored setting, else ")
    return p, flags


def main(argv: list[str] | None = None) -> None:
    parser, flags = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_flags(SampleConfig, args, flags)
    unset = [k for k in SAMPLING_KEYS if k not in given(args, flags)]
    from voxdiff.distributed import cleanup, is_main
    from voxdiff.sampling import sample_to_files

    try:
        summary = sample_to_files(cfg, unset=unset)
    finally:
        cleanup()
    if is_main():
        print(json.dumps({c: {k: v for k, v in s.items() if k in ("file", "shapes_per_s", "mean_occupancy", "empty")}
                          for c, s in summary["categories"].items()}))


if __name__ == "__main__":
    run_cli(main)
