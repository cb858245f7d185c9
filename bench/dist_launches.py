"""Launch tests/test_distributed.py's torchrun driver N times in a row and count the launches that abort.

Each launch gets a fresh temporary directory (toy voxels, AE checkpoint, spec, driver), runs 2 CPU ranks on gloo with
OMP_NUM_THREADS=1 under `nice -n 10`, and is judged by its exit status and stderr: an abort is a launch whose stderr
shows `terminate called` / SIGABRT / a signal ending a rank; any other non-zero exit or a missing rank{r}.json counts
as a failure too. Failed launches keep their stderr (and, under `ulimit -c unlimited`, the rank's core file) under
--log_dir; --diagnose makes an aborting rank print its C++ and Python stacks.

    .venv/bin/python bench/dist_launches.py --n 100 --standalone   # torchrun --standalone --nproc_per_node 2
    .venv/bin/python bench/dist_launches.py --n 100                # the test's own launch (a free port on 127.0.0.1)

Before the clean-ending fix in voxdiff.distributed, 2 of 50 --standalone launches aborted here, a gloo worker thread
killed in interpreter shutdown; a long run takes a while (10-30 s a launch on 2 busy cores): use nohup and poll.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout (or a snapshot of it) first

from helpers import make_voxel_dir  # noqa: E402
from test_distributed import ENV, free_port, prepare_driver  # noqa: E402

ABORT = re.compile(r"terminate called|SIGABRT|Signal 6|exitcode\s*:\s*-6|core dumped|Fatal Python error")


def launch(i: int, args: argparse.Namespace) -> tuple[str, float, str]:
    """One launch in a fresh directory: ("ok" | "abort" | "fail", seconds, stderr)."""
    with tempfile.TemporaryDirectory(prefix=f"distlaunch{i}_") as tmp:
        d = Path(tmp)
        data = make_voxel_dir(d / "voxels32")
        argv = prepare_driver(d, data)
        rdzv = ["--standalone"] if args.standalone else ["--master_addr", "127.0.0.1", "--master_port",
                                                         str(free_port())]
        cmd = ["nice", "-n", str(args.nice), sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               *rdzv, *argv]
        env = {**ENV, "OMP_NUM_THREADS": "1"}
        if args.diagnose:  # a rank that aborts prints its C++ stack (torch's terminate handler) and Python's
            env.update(PYTHONFAULTHANDLER="1", TORCH_CUSTOM_TERMINATE="1")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=args.timeout)
            rc, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, err = -999, f"TIMEOUT after {args.timeout}s\n{e.stderr or ''}"
        dt = time.perf_counter() - t0
        reports = all((d / f"rank{k}.json").is_file() for k in range(2))
        if rc == 0 and reports:
            return "ok", dt, err
        for core in d.glob("core*"):  # with `ulimit -c unlimited`: keep an aborted rank's core for gdb
            log = Path(args.log_dir)
            log.mkdir(parents=True, exist_ok=True)
            shutil.move(str(core), log / f"launch{i + 1}_{core.name}")
        return ("abort" if ABORT.search(err) else "fail"), dt, f"rc={rc} reports={reports}\n{err}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="launches (default: %(default)s)")
    p.add_argument("--nice", type=int, default=10, help="niceness of each launch (default: %(default)s)")
    p.add_argument("--timeout", type=int, default=300, help="seconds before a launch counts as hung")
    p.add_argument("--standalone", action="store_true", help="torchrun --standalone instead of the test's launch")
    p.add_argument("--diagnose", action="store_true",
                   help="PYTHONFAULTHANDLER=1 and TORCH_CUSTOM_TERMINATE=1 in the ranks: an abort prints its stacks")
    p.add_argument("--log_dir", default=str(Path(tempfile.gettempdir()) / "dist_launches_logs"),
                   help="where failed launches' stderr goes (default: %(default)s)")
    args = p.parse_args()
    if args.n < 1:
        p.error("--n must be >= 1")
    counts = {"ok": 0, "abort": 0, "fail": 0}
    secs: list[float] = []
    for i in range(args.n):
        kind, dt, err = launch(i, args)
        counts[kind] += 1
        secs.append(dt)
        print(f"launch {i + 1}/{args.n}: {kind} {dt:.1f}s", flush=True)
        if kind != "ok":
            log = Path(args.log_dir)
            log.mkdir(parents=True, exist_ok=True)
            (log / f"launch{i + 1}_{kind}.txt").write_text(err)
    print(f"{args.n} launches, {counts['abort']} aborts, {counts['fail']} other failures")
    print(f"per-launch seconds: mean {statistics.mean(secs):.1f}, median {statistics.median(secs):.1f}, "
          f"min {min(secs):.1f}, max {max(secs):.1f}")
    sys.exit(1 if counts["abort"] or counts["fail"] else 0)


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
