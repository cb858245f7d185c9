"""Training loops: `train_autoencoder` (training/autoencoder.py) and `train_ldm` (training/ldm.py).

One file per loop so each reads top to bottom (nanoGPT style); the skeleton both share (the run's set-up, step
accounting, the guarded optimizer step, the logging and checkpoint cadences, the result dict) is written once in
training/common.py (`start_run`, `open_run_dir`, `choose_runtime`, `StepLoop`).
"""
