"""What the fault-injection tests share (tests/test_faults.py, tests/test_faults_cli.py): snapshots of a directory to
show that a failed command changed no file, the in-process CLI runner, the one-line assertion, a full disk, and ways to
damage a checkpoint."""

from __future__ import annotations

import errno
import hashlib
import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import ROOT

from voxdiff.cli import load_script
from voxdiff.errors import run_cli

VOXDIFF = "python -m voxdiff"


def snapshot(root: Path, skip: Callable[[Path], bool] = lambda p: False) -> dict[str, str]:
    """sha256 of every file under `root` (relative path -> hex): compared before and after a failed command."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not skip(p)}


def assert_unchanged(root: Path, before: dict[str, str], skip: Callable[[Path], bool] = lambda p: False) -> None:
    """Every file of `before` is still there, byte-identical, and nothing new appeared but a directory lock."""
    after = snapshot(root, skip)
    assert {k: after.get(k) for k in before} == before, [k for k in before if after.get(k) != before[k]]
    assert {k for k in set(after) - set(before) if Path(k).name != ".lock"} == set()


def no_logs(p: Path) -> bool:
    return p.suffix == ".log"  # logs are append-only history: a failure during a stage is recorded there


def cli(capsys: pytest.CaptureFixture[str], script: str, argv: list[str]) -> tuple[int, str]:
    """Run a CLI's main through run_cli in-process, as its user would see it: (exit status, stderr)."""
    if script == VOXDIFF:
        from voxdiff.__main__ import main
    else:
        main = load_script(ROOT / script).main
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv, prog=VOXDIFF if script == VOXDIFF else script)
    return int(exc.value.code), capsys.readouterr().err


def one_line(code: int, err: str, *needles: str) -> str:
    """Assert a failure reported as exactly one line holding every needle; returns it."""
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def no_space(*args: Any, **kwargs: Any) -> Any:
    """A write that fails like a full disk does: ENOSPC, and no file name (write(2) reports none)."""
    raise OSError(errno.ENOSPC, "No space left on device")


def flip_tensor_byte(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor record of a torch zip, keeping the archive valid (torch does
    not check the records' CRCs, so only the checkpoint's own digest can tell)."""
    data = bytearray(path.read_bytes())
    records = [i for i in zipfile.ZipFile(io.BytesIO(bytes(data))).infolist() if "/data/" in i.filename]
    info = max(records, key=lambda i: i.file_size)  # data.pkl (configs, metadata, RNG states) can be larger
    off = info.header_offset
    name_len, extra_len = (int.from_bytes(data[off + k : off + k + 2], "little") for k in (26, 28))
    data[off + 30 + name_len + extra_len + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def with_nan_weights(path: Path, part: str = "model", digest: bool = True) -> None:
    """Rewrite a checkpoint with NaNs in its first floating tensor of `part`, saved the normal way (a valid digest
    of the NaN weights), or, with digest=False, as a file written before digests existed."""
    raw = torch.load(path, weights_only=True)
    raw[part] = {k: v.clone() for k, v in raw[part].items()}  # the tiny LDM's model and EMA share their storage
    key = next(k for k, v in raw[part].items() if v.is_floating_point())
    raw[part][key].reshape(-1)[:16] = float("nan")
    if digest:
        from voxdiff.checkpoint import checkpoint_digest

        raw["digest"] = {**raw["digest"], **checkpoint_digest(raw)}
    else:
        raw.pop("digest", None)
    torch.save(raw, path)


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "random_bytes": lambda p: p.write_bytes(np.random.default_rng(7).bytes(4096)),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "text": lambda p: p.write_text("this is not a checkpoint\n"),
    "empty": lambda p: p.write_bytes(b""),
    "flipped_byte": flip_tensor_byte,
    "nan_weights": with_nan_weights,
}
