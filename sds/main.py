r"""Generate shapes by score distillation (SDS) on the latent diffusion model: flags -> SDSConfig -> run_sds.

Example:
    python sds/main.py --ldm_ckpt_path checkpoints/ldm --ae_ckpt_path checkpoints/ae --category chair \
        --num_samples 100 --num_steps 200 --lr 0.02 --cfg_scale 1.0 --init ddim --save_dir samples_sds
Writes {save_dir}/{category}.npy, (N, R, R, R) uint8 in {0, 1} (what eval.py reads), sds.json, sds.log and renders/.
Gradient: w(t) (ε̂(z_t, t, c) − ε), w(t) = 1 − ᾱ_t (--weighting sds) or 1 (uniform); ε̂ = (1 + w)·ε_cond − w·ε_uncond
with w = --cfg_scale (0 or --no_use_cfg: plain conditional). --category all runs every category in turn.
"""

from __future__ import annotations

import argparse
import json

from voxdiff.cli import ArgumentParser, HelpFormatter, add_config_arguments
from voxdiff.cliflags import config_from_flags
from voxdiff.config import SDSConfig
from voxdiff.errors import run_cli


def build_parser() -> tuple[argparse.ArgumentParser, list]:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    return p, add_config_arguments(p, SDSConfig)


def main(argv: list[str] | None = None) -> None:
    parser, flags = build_parser()
    cfg = config_from_flags(SDSConfig, parser.parse_args(argv), flags)
    from voxdiff.sds import run_sds

    out = run_sds(cfg)
    keys = ("file", "final_grad_norm_mean", "mean_occupancy", "empty", "s_per_step")
    print(json.dumps({cat: {k: s[k] for k in keys} for cat, s in out.items()}))


if __name__ == "__main__":
    run_cli(main)
