"""Training steps/s at each intra-op thread count and OpenMP wait policy, on an idle machine and beside 1 and 2 busy
processes: why voxdiff chooses its thread count at start-up (voxdiff.threads) instead of taking every core.

Each cell is a fresh worker process (OMP_WAIT_POLICY is read once, at start-up) that times `--steps` pure training
steps (forward, loss, backward, AdamW) of one preset network after 3 warm-up steps. Busy processes are plain Python
spin loops, started before the worker and killed after it. Ratios are against the 2-thread, default-policy, idle cell
of the same network, measured in this same run.

    python bench/bench_threads.py                       # demo networks (medium uses the same ones), 0-2 busy
    python bench/bench_threads.py --presets demo --busy 0 1 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPIN = "while True: pass"


def worker(preset: str, net: str, threads: int, steps: int, precision: str) -> dict[str, float]:
    """Steps/s of `steps` pure training steps of the preset's `net` ("ae" or "unet") at `threads` threads."""
    import torch
    import torch.nn.functional as F

    from voxdiff.models.autoencoder import VoxelAutoencoder
    from voxdiff.models.unet3d import UNet3D
    from voxdiff.precision import autocast
    from voxdiff.presets import run_preset

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    cfg = run_preset(preset)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else None
    if net == "ae":
        model = VoxelAutoencoder(cfg.ae.model)
        res, b = cfg.ae.model.resolution, cfg.ae.batch_size
        x = (torch.rand(b, 1, res, res, res, generator=g) > 0.95).float()
        loss_fn = lambda: F.binary_cross_entropy_with_logits(model(x).float(), x)  # noqa: E731
    else:
        model = UNet3D(cfg.ldm.model)
        b = cfg.ldm.batch_size
        z = torch.randn(b, 16, 8, 8, 8, generator=g)
        t, y = torch.randint(0, 1000, (b,), generator=g), torch.randint(0, 3, (b,), generator=g)
        loss_fn = lambda: F.mse_loss(model(z, t, y).float(), z)  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with autocast(torch.device("cpu"), dtype):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return {"steps_per_s": steps / (time.perf_counter() - t0)}


def cell(preset: str, net: str, threads: int, policy: str | None, busy: int, steps: int, precision: str) -> float:
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
        env.pop("OMP_WAIT_POLICY", None)
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        out = subprocess.run([sys.executable, __file__, "--worker", preset, net, str(threads), str(steps), precision],
                             env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["steps_per_s"]
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, preset, net, threads, steps, precision = sys.argv
        print(json.dumps(worker(preset, net, int(threads), int(steps), precision)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["demo"])
    ap.add_argument("--busy", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threads", nargs="+", type=int, default=None, help="default: 1, 2, 4 ... the cores")
    ap.add_argument("--policies", nargs="+", default=["default", "PASSIVE"])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                    help="default: bf16 where the CPU has native bf16, else fp32 (speed only: see numerics_check.py)")
    a = ap.parse_args()
    from voxdiff.precision import cpu_has_bf16
    from voxdiff.threads import available_cores, candidates

    precision = a.precision or ("bf16" if cpu_has_bf16() else "fp32")
    counts = a.threads or candidates(available_cores())
    print(f"# {sys.platform}, {os.cpu_count()} CPUs, {precision}; steps/s of pure training steps "
          f"(ratio to the idle {max(counts)}-thread default-policy cell)")
    for preset in a.presets:
        for net in ("ae", "unet"):
            print(f"\n## {preset} {net}\n\n| threads | wait policy | " +
                  " | ".join(f"{b} busy" for b in a.busy) + " |\n|---|---|" + "---|" * len(a.busy))
            base = None
            rows = []
            for threads in counts:
                for policy in a.policies:
                    rates = [cell(preset, net, threads, None if policy == "default" else policy, b, a.steps,
                                  precision) for b in a.busy]
                    if threads == max(counts) and policy == "default" and a.busy[0] == 0:
                        base = rates[0]
                    rows.append((threads, policy, rates))
            for threads, policy, rates in rows:
                cells = [f"{rate:.2f}" + (f" ({rate / base:.2f}x)" if base else "") for rate in rates]
                print(f"| {threads} | {policy} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
