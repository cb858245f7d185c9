"""Numerics of this machine: forward and backward of every preset's networks in fp32 and bf16 against fp64, and the
minimal Conv3d reproduction at each spatial size. Exits 1 when any result is wrong.

Kernels differ between machines of one kind (oneDNN picks them per CPU), and a wrong one can be right elsewhere: on
some AMD EPYC CPUs the bf16 Conv3d weight gradient at a 2³ input is garbage in a third of its calls, while Intel Xeon
CPUs with AMX compute it exactly. Run this where you train; `--precision auto` runs a smaller check of the same kind
at start-up (voxdiff.precision), but this one prints the whole picture for a bug report.

For each network (the preset's model and batch size): one fp64 reference forward + backward on fixed inputs, then fp32
once and bf16 autocast `--trials` times; an error is ‖x − x_fp64‖ / ‖x_fp64‖ for the output and for each parameter's
gradient (the worst is printed). Limits: fp32 1e-3, bf16 0.25 (right bf16 kernels stay near 1e-2).

    python bench/numerics_check.py                          # demo and medium networks, Conv3d at 1..8³
    python bench/numerics_check.py --presets demo --trials 30
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from voxdiff.models.autoencoder import VoxelAutoencoder
from voxdiff.models.unet3d import UNet3D
from voxdiff.precision import cpu_has_bf16
from voxdiff.presets import run_preset

LIMITS = {"fp32": 1e-3, "bf16": 0.25}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a = a.double()
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def _run(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor], mode: str
         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output (the loss) and parameter gradients of one forward + backward in `mode` (fp64, fp32, bf16)."""
    model.zero_grad(set_to_none=True)
    if mode == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model)
    else:
        loss = loss_fn(model)
    loss.float().backward() if mode != "fp64" else loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def check_network(name: str, model: torch.nn.Module, make_loss: Callable[[torch.dtype], Any], trials: int
                  ) -> list[dict[str, Any]]:
    """fp64 reference, fp32 once, bf16 `trials` times; one row per precision with the worst errors."""
    model = model.eval()
    names = [n for n, _ in model.named_parameters()]
    ref64 = model.double()
    ref_loss, ref_grads = _run(ref64, make_loss(torch.float64), "fp64")
    model = ref64.float()
    rows = []
    for mode, n in (("fp32", 1), ("bf16", trials)):
        worst_out, worst_grad, worst_name, bad, t0 = 0.0, 0.0, "", 0, time.perf_counter()
        for _ in range(n):
            loss, grads = _run(model, make_loss(torch.float32), mode)
            e_out = _rel(loss, ref_loss)
            errs = [_rel(g, ref) for g, ref in zip(grads, ref_grads)]
            i = max(range(len(errs)), key=errs.__getitem__)
            worst_out = max(worst_out, e_out)
            if errs[i] > worst_grad:
                worst_grad, worst_name = errs[i], names[i]
            bad += max(e_out, errs[i]) > LIMITS[mode]
        rows.append({"network": name, "precision": mode, "trials": n, "forward": worst_out, "backward": worst_grad,
                     "where": worst_name, "bad": bad, "s": (time.perf_counter() - t0) / n})
    return rows


def preset_networks(preset: str) -> list[tuple[str, torch.nn.Module, Callable[[torch.dtype], Any]]]:
    """The preset's AE and U-Net with fixed inputs of the preset's batch size."""
    cfg = run_preset(preset)
    g = torch.Generator().manual_seed(0)
    res, b = cfg.ae.model.resolution, cfg.ae.batch_size
    x = (torch.rand(b, 1, res, res, res, generator=g) > 0.95).double()
    torch.manual_seed(0)
    ae = VoxelAutoencoder(cfg.ae.model)
    lat = tuple(ae.latent_shape)
    unet = UNet3D(cfg.ldm.model)
    bz = cfg.ldm.batch_size
    z = torch.randn(bz, *lat, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (bz,), generator=g)
    y = torch.randint(0, 3, (bz,), generator=g)
    return [
        (f"{preset} AE {res}³ b{b}", ae,
         lambda dt: lambda m: F.binary_cross_entropy_with_logits(m(x.to(dt)).to(dt), x.to(dt))),
        (f"{preset} U-Net {lat} b{bz}", unet, lambda dt: lambda m: F.mse_loss(m(z.to(dt), t, y).to(dt), z.to(dt))),
    ]


def conv3d_reproduction(sizes: tuple[int, ...], trials: int, ci: int = 64, co: int = 64, b: int = 32) -> dict[int, int]:
    """The minimal reproduction for an upstream report: of `trials` bf16-autocast Conv3d forward + backward passes on
    a random (b, ci, s, s, s) input, how many give a weight gradient above 1.0 (right ones stay far below)."""
    out = {}
    for s in sizes:
        bad = 0
        for _ in range(trials):
            c = torch.nn.Conv3d(ci, co, 3, padding=1)
            x = torch.randn(b, ci, s, s, s, requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = c(x)
            y.float().pow(2).mean().backward()
            bad += float(c.weight.grad.abs().max()) > 1.0
        out[s] = bad
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["demo", "medium"])
    ap.add_argument("--trials", type=int, default=20, help="bf16 passes per network and Conv3d size")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cpu = platform.processor() or "?"
    if Path("/proc/cpuinfo").is_file():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
    print(f"# {cpu}; torch {torch.__version__}; {torch.get_num_threads()} threads; native bf16: {cpu_has_bf16()}; "
          f"oneDNN: {torch.backends.mkldnn.is_available()}")
    wrong = 0
    print("\n| network | precision | trials | forward err | backward err (worst) | where | wrong | s/pass |")
    print("|---|---|---|---|---|---|---|---|")
    seen: set[str] = set()
    for preset in a.presets:
        for name, model, make_loss in preset_networks(preset):
            key = repr(model)[:2000] + name.split(" ", 1)[1]
            if key in seen:
                continue
            seen.add(key)
            for row in check_network(name, model, make_loss, a.trials):
                wrong += row["bad"] > 0
                print(f"| {row['network']} | {row['precision']} | {row['trials']} | {row['forward']:.2e} | "
                      f"{row['backward']:.2e} | {row['where']} | {row['bad']} | {row['s']:.3f} |")
    sizes = (1, 2, 3, 4, 8)
    rep = conv3d_reproduction(sizes, a.trials)
    print(f"\nConv3d(64, 64, 3) bf16 weight gradient > 1.0, of {a.trials} passes at b=32, per input side: {rep}")
    wrong += sum(v > 0 for v in rep.values())
    print("RESULT:", "all right" if wrong == 0 else f"{wrong} wrong (do not use bf16 for those networks here)")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
