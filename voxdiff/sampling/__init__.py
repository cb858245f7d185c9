"""Sampling a trained latent diffusion model into voxel grids, one job per module (diffusers-style):

- `voxdiff.sampling.guidance`: the classifier-free guidance formula (`guided_eps`, one batched forward for both
  branches) and the reverse-diffusion loop (`sample_latents`); shared with SDS.
- `voxdiff.sampling.pipeline`: `LatentVoxelPipeline` (from_pretrained / from_checkpoints, `pipe(...)`, and every step
  from noise to grids), `VoxelPipelineOutput`, the per-batch seeds and the resolution of settings against the model's
  stored ones.
- `voxdiff.sampling.writer`: `sample_to_files`, the resumable, sharded job writing `{category}.npy` files.

    from voxdiff.sampling import LatentVoxelPipeline
    pipe = LatentVoxelPipeline.from_pretrained("models/medium")
    out = pipe("chair", num_samples=16, seed=0)                      # out.grids: (16, R, R, R) bool

Imports run one way, guidance <- pipeline <- writer, and from those down to the leaf modules (config, schedulers,
binarize, precision, errors, files, logs, device, ...): nothing in voxdiff imports "up" into the stages that use
sampling (sds, tuning, training, pipeline stages). No plotting library is imported here: the writer's PNGs come from
voxdiff.render, loaded only when a job renders. Every name below is re-exported so that
`from voxdiff.sampling import X` keeps working.
"""

from __future__ import annotations

from voxdiff.sampling.guidance import guided_eps, sample_latents
from voxdiff.sampling.pipeline import (
    OUTPUT_KINDS,
    LatentVoxelPipeline,
    OutputKind,
    SamplingPlan,
    VoxelPipelineOutput,
    batch_seed,
    resolve_sampling,
    upsample_nearest,
)
from voxdiff.sampling.writer import _progress_key as _progress_key  # private; tests/test_runtime.py imports it here
from voxdiff.sampling.writer import sample_to_files

__all__ = ["guided_eps", "sample_latents", "upsample_nearest", "batch_seed", "resolve_sampling", "SamplingPlan",
           "VoxelPipelineOutput", "LatentVoxelPipeline", "OutputKind", "OUTPUT_KINDS", "sample_to_files"]
