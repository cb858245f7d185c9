"""One prepared GPU check, one JSON: the CUDA paths of the full preset, timed, in under 8 minutes on one GPU.

1. the full preset's AE (64³ input, 16×8³ latent) training steps in bf16 autocast with channels_last_3d: shapes/s;
2. the seed U-Net's training steps on (16, 8, 8, 8) latents in bf16: steps/s;
3. 1,000 samples per category with DDIM-50 and guidance, decoded to 128³ and binarised, with randomly initialised
   networks of the full preset (speed does not depend on the weights): seconds per category (goal ≤ 30 s on an
   H100/H200);
4. the torch metrics path (--device cuda) against the numpy path on N × N shapes at 64³: both must give identical
   numbers (the integers of the exact Chamfer sums), and their times;
5. the code paths that only break on a GPU, at the tiny preset's size (seconds): AE training, LDM training with the
   preview, the same LDM resumed (a latent-cache hit: the AE must still be on the GPU), sampling to files, SDS, and a
   torchrun sampling job; each reports "ok" or its error line, with the precision and threads each run chose.

    python bench/gpu_check.py --out gpu_check.json                   # on a GPU machine
    python bench/gpu_check.py --tiny --device cpu --out check.json   # the test suite's CPU smoke run

--tiny shrinks every size so that the same code runs in seconds on a CPU.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from voxdiff.checkpoint import AEMeta
from voxdiff.cli import ArgumentParser, DefaultsHelpFormatter
from voxdiff.config import CATEGORIES, AEConfig, SchedulerConfig, unet_preset
from voxdiff.device import flush_denormals, resolve_device
from voxdiff.files import atomic_write_json
from voxdiff.losses import reconstruction_loss
from voxdiff.metrics import Backend, chamfer_blocks
from voxdiff.models.autoencoder import VoxelAutoencoder
from voxdiff.models.unet3d import UNet3D
from voxdiff.precision import autocast, choose_precision, forward_probe, gradient_probe
from voxdiff.presets import run_preset
from voxdiff.sampling import LatentVoxelPipeline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def ae_steps(cfg: AEConfig, batch: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Training steps of the AE in the trainer's precision and memory layout."""
    torch.manual_seed(0)
    fmt = torch.channels_last_3d if device.type == "cuda" else torch.contiguous_format
    model = VoxelAutoencoder(cfg).to(device, memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    res = cfg.resolution
    x = (torch.rand(batch, 1, res, res, res, device=device) > 0.96).float().contiguous(memory_format=fmt)
    choice = choose_precision("auto", device, *gradient_probe(model, lambda m: reconstruction_loss(m(x), x, "bce")))
    amp = choice.dtype

    def step() -> None:
        with autocast(device, amp):
            logits = model(x)
        loss = reconstruction_loss(logits, x, "bce")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    s = _timed(step, steps, 2, device)
    return {"resolution": res, "latent": list(model.latent_shape), "batch": batch, "precision": choice.record(),
            "s_per_step": s, "shapes_per_s": batch / s}


def unet_steps(unet_cfg: Any, latent: tuple[int, ...], batch: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Training steps (forward, MSE, backward, AdamW) of a U-Net on latents of `latent` shape."""
    torch.manual_seed(0)
    model = UNet3D(unet_cfg, class_dropout=0.1).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, *latent, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, 3, (batch,), device=device)
    choice = choose_precision("auto", device, *gradient_probe(model, lambda m: F.mse_loss(m(x, t, y).float(), x)))
    amp = choice.dtype

    def step() -> None:
        with autocast(device, amp):
            eps = model(x, t, y)
        loss = F.mse_loss(eps.float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    s = _timed(step, steps, 2, device)
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "batch": batch, "precision": choice.record(),
            "s_per_step": s, "steps_per_s": 1 / s}


def sampling(ae_cfg: AEConfig, unet_cfg: Any, n: int, batch: int, steps: int, resolution: int,
             device: torch.device) -> dict[str, Any]:
    """n samples per category: DDIM `steps` with guidance, decode, binarise, upsample to `resolution`."""
    torch.manual_seed(0)
    ae = VoxelAutoencoder(ae_cfg).eval()
    unet = UNet3D(unet_cfg).eval()
    c = ae_cfg.latent_channels
    meta = AEMeta(latent_mean=[0.0] * c, latent_std=[1.0] * c)
    unet, ae = unet.to(device), ae.to(device)
    z, t, y = (torch.randn(8, *ae.latent_shape, device=device), torch.randint(0, 1000, (8,), device=device),
               torch.arange(8, device=device) % 4)
    choice = choose_precision("auto", device, forward_probe(unet, lambda m: m(z, t, y)))  # as sample_to_files does
    pipe = LatentVoxelPipeline(unet=unet, ae=ae, scheduler_config=SchedulerConfig(), ae_meta=meta,
                               autocast_dtype=choice.dtype, precision=choice)
    binar = pipe.binarization("threshold", 0.5)
    out: dict[str, Any] = {"n": n, "batch": batch, "steps": steps, "resolution": resolution, "per_category_s": {},
                           "precision": choice.record()}
    for k, cat in enumerate(CATEGORIES):
        _sync(device)
        t0 = time.perf_counter()
        occupied = 0
        for s in range(0, n, batch):
            labels = torch.full((min(batch, n - s),), k, device=device)
            g = torch.Generator(device=device).manual_seed(s)
            z = pipe.sample_latents(labels, pipe.make_scheduler("ddim", steps), 1.0, g)
            occupied += int(pipe.to_grids(z, labels, binar, resolution).sum())
        _sync(device)
        out["per_category_s"][cat] = time.perf_counter() - t0
    out["max_s"] = max(out["per_category_s"].values())
    return out


def metrics_paths(n: int, resolution: int, device: torch.device) -> dict[str, Any]:
    """The exact Chamfer blocks of n samples against n references by the numpy and the torch path."""
    rng = np.random.default_rng(0)
    res = resolution

    def shapes(k: int) -> np.ndarray:  # sparse random plates and bars, like surface voxels
        g = np.zeros((k, res, res, res), np.uint8)
        for i in range(k):
            a, b = sorted(rng.integers(0, res, 2))
            g[i, a : b + 1, rng.integers(0, res), :] = 1
            g[i, rng.integers(0, res), :, rng.integers(0, res)] = 1
        return g

    s, ref = shapes(n), shapes(n)
    t0 = time.perf_counter()
    a = chamfer_blocks(s, ref, Backend(engine="numpy", workers=1))
    t_numpy = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = chamfer_blocks(s, ref, Backend(engine="torch", device=device))
    _sync(device)
    t_torch = time.perf_counter() - t0
    same = all(np.array_equal(x, y) for x, y in zip(a, b))
    return {"n": n, "resolution": res, "identical": bool(same), "numpy_s": t_numpy, "torch_s": t_torch}


def gpu_paths(device: torch.device, work: Path) -> dict[str, Any]:
    """Every stage at the tiny preset's size on `device`, each in its own try: what still breaks there is named."""
    import dataclasses
    import os
    import subprocess
    import sys

    from voxdiff.config import SPLITS, SDSConfig
    from voxdiff.data.partseg import COUNT_PRESETS, write_synthetic_partseg
    from voxdiff.data.voxelize import preprocess
    from voxdiff.sampling import sample_to_files
    from voxdiff.sds import run_sds
    from voxdiff.training.autoencoder import train_autoencoder
    from voxdiff.training.ldm import train_ldm

    tiny, dev, out = run_preset("tiny"), str(device), {}
    data, ae_dir, ldm_dir = work / "data", work / "ae", work / "ldm"
    ae = dataclasses.replace(tiny.ae, dataset_path=str(data), ckpt_path=str(ae_dir), device=dev, overwrite=True)
    ldm = dataclasses.replace(tiny.ldm, dataset_path=str(data), ae_ckpt_path=str(ae_dir), ckpt_path=str(ldm_dir),
                              device=dev, preview=True, overwrite=True)
    sample = dataclasses.replace(tiny.sample, ae_ckpt_path=str(ae_dir), ldm_ckpt_path=str(ldm_dir),
                                 save_dir=str(work / "samples"), device=dev)
    def make_data() -> str:
        write_synthetic_partseg(data, COUNT_PRESETS["tiny"], seed=0, progress=False)
        preprocess(data, data, resolution=32, categories=CATEGORIES, splits=SPLITS, progress=False)
        return "ok"

    steps: list[tuple[str, Any]] = [
        ("data", make_data),
        ("ae_train", lambda: train_autoencoder(ae, progress=False)["runtime"]),
        ("ldm_train_preview", lambda: train_ldm(ldm, progress=False)["runtime"]),
        ("ldm_resume_cache_hit_preview", lambda: train_ldm(dataclasses.replace(
            ldm, num_steps=ldm.num_steps + 2, resume=True, overwrite=False), progress=False)["runtime"]),
        ("sample_to_files", lambda: sample_to_files(sample, progress=False)["runtime"]),
        ("sds", lambda: run_sds(SDSConfig(ae_ckpt_path=str(ae_dir), ldm_ckpt_path=str(ldm_dir), device=dev,
                                          save_dir=str(work / "sds"), num_samples=2, batch_size=2, num_steps=3,
                                          resolution=32, render_every=None), progress=False) and "ok"),
        ("torchrun_sample", lambda: subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
             str(Path(__file__).resolve().parents[1] / "diffusion" / "sample.py"), "--ae_ckpt_path", str(ae_dir),
             "--ldm_ckpt_path", str(ldm_dir), "--save_dir", str(work / "samples_torchrun"), "--num_samples", "4",
             "--batch_size", "2", "--steps", "3", "--sampler", "ddim", "--resolution", "32", "--device", dev],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
            check=True) and "ok"),
    ]
    for name, fn in steps:
        t0 = time.perf_counter()
        try:
            result = fn()
            out[name] = {"ok": True, "s": round(time.perf_counter() - t0, 2), "result": result}
        except Exception as e:  # noqa: BLE001 - the check reports every failure and goes on
            err = getattr(e, "stderr", None) or str(e)
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {str(err).strip().splitlines()[-1:]}"}
    out["all_ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--tiny", action="store_true", help="every size shrunk: a CPU smoke run of the same code")
    p.add_argument("--out", default="gpu_check.json", help="the JSON written")
    p.add_argument("--no_paths", action="store_true", help="skip 5 (the tiny end-to-end stage paths)")
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    flush_denormals(device)
    full = run_preset("full")
    t0 = time.perf_counter()
    report: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "platform": platform.platform(),
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                              "tiny": a.tiny, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if a.tiny:
        ae_cfg, unet_cfg = AEConfig(resolution=16, channels=(4, 8), latent_channels=4), unet_preset(
            "small", ch=8, num_groups=4, in_channels=4)
        sizes = dict(ae_batch=2, unet_batch=2, steps=2, n=4, batch=4, ddim=2, out_res=32, metrics_n=6, metrics_r=16)
    else:
        ae_cfg, unet_cfg = full.ae.model, full.ldm.model
        sizes = dict(ae_batch=full.ae.batch_size, unet_batch=full.ldm.batch_size, steps=20, n=1000, batch=500,
                     ddim=50, out_res=128, metrics_n=1000, metrics_r=64)
    latent = VoxelAutoencoder(ae_cfg).latent_shape
    report["ae"] = ae_steps(ae_cfg, sizes["ae_batch"], sizes["steps"], device)
    report["unet"] = unet_steps(unet_cfg, latent, sizes["unet_batch"], sizes["steps"], device)
    report["sampling"] = sampling(ae_cfg, unet_cfg, sizes["n"], sizes["batch"], sizes["ddim"], sizes["out_res"],
                                  device)
    if not a.tiny:
        report["sampling"]["goal_30s_met"] = report["sampling"]["max_s"] <= 30.0
    report["metrics"] = metrics_paths(sizes["metrics_n"], sizes["metrics_r"], device)
    if not a.no_paths:
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            report["paths"] = gpu_paths(device, Path(work))
    report["total_s"] = time.perf_counter() - t0
    atomic_write_json(Path(a.out), report)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    from voxdiff.errors import run_cli

    run_cli(main)
