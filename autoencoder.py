"""Train the 3D conv voxel autoencoder (one AE over all categories): flags -> AETrainConfig -> train_autoencoder.

Example:
    python autoencoder.py --dataset_path data/hdf5_data --ckpt_path checkpoints/ae --num_epochs 50
Writes {ckpt_path}/last.pt, best.pt (best calibrated IoU on a held-out slice of the train split), log.csv/.jsonl/.png
and train.log. An existing run in --ckpt_path is continued with --resume or replaced with --overwrite.
Several GPUs: `torchrun --nproc_per_node=K autoencoder.py ... [--sync_bn]` (--batch_size stays the global batch).
"""

from __future__ import annotations

import argparse
import json

from voxdiff.cli import ArgumentParser, HelpFormatter, add_config_arguments
from voxdiff.cliflags import config_from_flags
from voxdiff.config import AETrainConfig
from voxdiff.errors import run_cli


def build_parser() -> tuple[argparse.ArgumentParser, list]:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    return p, add_config_arguments(p, AETrainConfig)


def main(argv: list[str] | None = None) -> None:
    parser, flags = build_parser()
    cfg = config_from_flags(AETrainConfig, parser.parse_args(argv), flags)
    from voxdiff.distributed import cleanup, is_main
    from voxdiff.training.autoencoder import train_autoencoder

    try:
        result = train_autoencoder(cfg)
    finally:
        cleanup()
    if is_main():
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in result.items()}))


if __name__ == "__main__":
    run_cli(main)
