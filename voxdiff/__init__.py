"""voxdiff: latent diffusion for 3D voxel shapes (data, autoencoder, UNet3D DDPM with CFG, SDS, exact metrics)."""

__version__ = "0.3.0"
