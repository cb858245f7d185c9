"""Training loops: `train_autoencoder` (training/autoencoder.py) and `train_ldm` (training/ldm.py).

One file per loop so each reads top to bottom (nanoGPT style); what both share lives in training/common.py.
"""
