r"""Train the latent UNet3D DDPM with classifier-free guidance: flags -> LDMTrainConfig -> train_ldm.

Example:
    python diffusion/train.py --dataset_path data/hdf5_data --ae_ckpt_path checkpoints/ae --ckpt_path checkpoints/ldm \
        --unet_preset course --num_steps 100000
Writes {ckpt_path}/last.pt, best.pt (lowest loss of the EMA model on the AE's held-out slice of the train split),
log.csv/.jsonl/.png, train.log and preview renders. Training latents are encoded once by the frozen AE and cached
beside its checkpoint (or in --latent_cache_dir). Label dropout for guidance is on by default (--no_use_cfg: off).
--unet_preset picks the network size; the flags after it (--ch, --ch_mult, ...) change single fields of it.
An existing run in --ckpt_path is continued with --resume or replaced with --overwrite.
Several GPUs: `torchrun --nproc_per_node=K diffusion/train.py ...` (--batch_size stays the global batch; resume works
under any K).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from voxdiff.cli import ArgumentParser, HelpFormatter, add_config_arguments
from voxdiff.cliflags import config_from_flags
from voxdiff.config import UNET_PRESETS, LDMTrainConfig, unet_preset
from voxdiff.errors import run_cli


def build_parser(preset: str = "course") -> tuple[argparse.ArgumentParser, list]:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--unet_preset", default=preset, choices=list(UNET_PRESETS),
                   help="named U-Net size: course (the course starter code's network) or small (CPU runs) "
                        "(default: %(default)s)")
    defaults = dataclasses.replace(LDMTrainConfig(), model=unet_preset(preset))
    return p, add_config_arguments(p, LDMTrainConfig, defaults)


def main(argv: list[str] | None = None) -> None:
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--unet_preset", default="course", choices=list(UNET_PRESETS))
    preset = pre.parse_known_args(argv)[0].unet_preset
    parser, flags = build_parser(preset)
    args = parser.parse_args(argv)
    base = dataclasses.replace(LDMTrainConfig(), model=unet_preset(preset))
    cfg = config_from_flags(LDMTrainConfig, args, flags, base)
    from voxdiff.distributed import cleanup, is_main
    from voxdiff.training.ldm import train_ldm

    try:
        result = train_ldm(cfg)
    finally:
        cleanup()
    if is_main():
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in result.items()}))


if __name__ == "__main__":
    run_cli(main)
