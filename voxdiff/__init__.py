"""voxdiff: latent diffusion for 3D voxel shapes (data, autoencoder, UNet3D DDPM with CFG, SDS, exact metrics).

    from voxdiff import LatentVoxelPipeline
    pipe = LatentVoxelPipeline.from_pretrained("models/medium")
    out = pipe("chair", num_samples=16)   # out.grids: (16, R, R, R) bool
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.5.0"
__all__ = ["__version__", "LatentVoxelPipeline", "VoxelPipelineOutput"]

if TYPE_CHECKING:
    from voxdiff.sampling import LatentVoxelPipeline, VoxelPipelineOutput


def __getattr__(name: str) -> Any:
    """The pipeline classes, imported on first use: `import voxdiff.config` (and the CLIs' --help) must not pay for
    torch (diffusers imports lazily for the same reason)."""
    if name in ("LatentVoxelPipeline", "VoxelPipelineOutput"):
        from voxdiff import sampling

        return getattr(sampling, name)
    raise AttributeError(f"module 'voxdiff' has no attribute {name!r}")
