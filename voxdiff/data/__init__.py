"""Data: procedural ShapeNet-like shapes, the ShapeNet PartSeg HDF5 layout, voxelization and datasets."""
