"""Small shared helpers: atomic file writes, device choice, seeding, CLI error reporting, file logging.

Standard library + numpy at import time; torch is imported lazily so that leaf modules (data, metrics) stay light.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm


class VoxdiffError(Exception):
    """An error caused by the user's input (bad file, flag or checkpoint): the CLIs print it as one line and exit 2."""


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's content, streamed (checkpoint identities, download checks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_path(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs should be readable like any other file
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on any error delete it.

    Readers never see a half-written file: the rename is atomic on POSIX file systems. An OSError raised while the
    temporary file is written (a full disk reports no file name at all) is raised again naming `path`, the file the
    user asked for, not the hidden temporary one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = _tmp_path(path)
    except OSError as e:
        raise _naming(e, path, None) from None
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _naming(e, path, tmp) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _naming(e: OSError, path: Path, tmp: Path | None) -> OSError:
    """`e` itself when it names some other file; else the same error naming `path` (a full disk names no file)."""
    if e.filename is not None and tmp is not None and Path(e.filename) != tmp:
        return e
    what = e.strerror or (str(e).splitlines()[0] if str(e) else type(e).__name__)
    if tmp is not None:
        what = what.replace(str(tmp), str(path))
    return OSError(e.errno, what, str(path))


def atomic_save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """np.save to `path` atomically (the file name is kept exactly, no `.npy` appended)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


NPY_MAGIC = b"\x93NUMPY"


def open_npy(path: str | os.PathLike[str], mmap_mode: Any = "r") -> np.ndarray:
    """np.load of a plain .npy array (memory-mapped by default), never unpickling; a one-line VoxdiffError naming the
    file when it is missing or not one (a text file, an .npz archive, a truncated file, an object array).

    The magic bytes are checked first: numpy reports any file without them as "pickled (object) data", which tells
    a user with a text file named .npy the wrong thing.
    """
    p = Path(path)
    if p.is_dir():
        raise VoxdiffError(f"{p} is a directory; expected a .npy file")
    if not p.is_file():
        raise VoxdiffError(f"file not found: {p}")
    with open(p, "rb") as f:
        head = f.read(len(NPY_MAGIC))
    if head != NPY_MAGIC:
        what = "it is empty" if not head else "it is an .npz archive" if head.startswith(b"PK") else \
            "it does not start with the .npy header"
        raise VoxdiffError(f"{p} is not a readable .npy array: not a .npy file ({what})")
    try:
        return np.load(p, mmap_mode=mmap_mode, allow_pickle=False)
    except ValueError as e:
        why = "it holds Python objects (dtype object), which are never loaded" if "allow_pickle" in str(e) else \
            f"truncated or damaged: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        raise VoxdiffError(f"{p} is not a readable .npy array ({why})") from None
    except EOFError:
        raise VoxdiffError(f"{p} is not a readable .npy array (truncated: it ends inside its header)") from None


def open_npy_memmap(path: str | os.PathLike[str], shape: tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
    """A new writable .npy memmap whose disk space is reserved up front (posix_fallocate), so a full disk is an
    OSError here, naming the file, and never a crash (SIGBUS) on a later write into the mapping."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    size = os.path.getsize(path)
    if hasattr(os, "posix_fallocate") and size:
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            del arr
            raise OSError(e.errno, f"cannot reserve {size / 2**20:.0f} MiB for {path}: {e.strerror}", str(path)) \
                from None
        finally:
            os.close(fd)
    return arr


@contextlib.contextmanager
def atomic_memmap(path: str | os.PathLike[str], shape: tuple[int, ...], dtype: Any = np.uint8) -> Iterator[np.ndarray]:
    """A writable .npy memmap that appears at `path` only if the block completes (streamed writes, bounded memory)."""
    with atomic_path(path) as tmp:
        arr = open_npy_memmap(tmp, shape, dtype)
        try:
            yield arr
            arr.flush()
        finally:
            del arr


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def resolve_device(name: str | None = "auto") -> Any:
    """torch.device from a flag: 'auto'/None -> cuda when available, else cpu; refuses cuda when there is none."""
    import torch  # lazily, like every torch import here: eval.py and visualize.py start without torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise VoxdiffError(f"invalid --device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VoxdiffError(f"--device {name} requested but CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise VoxdiffError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                           f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) global generators."""
    import torch  # lazily: see resolve_device

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_logger(name: str, log_file: str | os.PathLike[str] | None = None) -> logging.Logger:
    """A logger writing to `log_file` (appending) and warnings+ to stderr; progress itself goes to tqdm."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, delay=True)  # made at the first line: a refused command leaves none
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setLevel(logging.WARNING)
    sh.setFormatter(fmt)
    logger.addHandler(sh)
    return logger


def cli_name(argv0: str | None = None) -> str:
    """How the user started the program: `eval.py`, or `python -m voxdiff` for a package's `__main__.py`."""
    p = Path(argv0 if argv0 is not None else sys.argv[0])
    if p.name == "__main__.py":
        return f"python -m {p.parent.name}"
    return p.name


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None, prog: str | None = None) -> None:
    """Run a CLI `main(argv)`; user errors become one line on stderr, `{prog}: error: ...`, and exit status 2.

    VoxdiffError, ValueError, EOFError and OSError (missing or unreadable files, a full disk, a path that is a file
    where a directory is needed, ...) are reported in one line naming the file, without a traceback; a full disk
    exits 28 (ENOSPC). Anything else is a bug and keeps its traceback. `prog` defaults to `cli_name()`.
    """
    prog = prog or cli_name()
    try:
        main(argv)
    except (VoxdiffError, ValueError, EOFError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"{prog}: error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(28 if e.errno == errno.ENOSPC else 2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def os_error_line(e: OSError) -> str:
    """One line for an OSError: what went wrong and with which file."""
    what = e.strerror or str(e).splitlines()[0] if (e.strerror or str(e)) else type(e).__name__
    if e.errno == errno.ENOSPC:
        what = f"no space left on the device ({what})"
    name = e.filename if e.filename is not None else ""
    if name and str(name) not in what:
        return f"{name}: {what}"
    return what


def remove_leftovers(directory: str | os.PathLike[str]) -> None:
    """Delete what killed writers left in `directory`: temporary files and staging directories (`.*.tmp`).

    Call it only while holding the directory's lock (dir_lock): then no live writer owns them.
    """
    for tmp in Path(directory).glob(".*.tmp"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staging_dir(target: str | os.PathLike[str], names_last: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty hidden directory inside `target` (made if needed); when the block succeeds, move every file
    written into it onto `target` (same names), those named in `names_last` last; on any error delete it, so
    `target` keeps its previous set of files untouched.

    For writes that replace a set of files that only make sense together (a preprocessed dataset and its summary): a
    failure part-way (a bad input file, a full disk) can no longer leave old and new files mixed. Each move is an
    atomic rename on the same file system; the whole swap takes microseconds.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging.", suffix=".tmp", dir=target))
    try:
        yield stage
        order = {name: i for i, name in enumerate(names_last)}
        files = sorted((p for p in stage.iterdir() if p.is_file()), key=lambda p: (order.get(p.name, -1), p.name))
        for f in files:
            os.replace(f, target / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def dir_lock(directory: str | os.PathLike[str], what: str = "run",
             remove_created_on_error: bool = False) -> Iterator[Path]:
    """Hold an exclusive lock on `directory` (creating it) while a writer uses it, and clear what killed writers left.

    A second process that wants the same directory gets a one-line VoxdiffError instead of interleaving its files
    with the first's. Once the lock is held, temporary files of atomic writes (`.*.tmp`) in the directory can only be
    leftovers of a killed run and are removed. The lock is released when the block ends or the process dies. With
    `remove_created_on_error`, a directory this call created is removed again when the block fails.
    """
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise VoxdiffError(f"{d} is a file, not a directory")
    created = [p for p in (d, *d.parents) if not p.exists()]
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 256, 0).decode(errors="replace").strip() or "?"
            raise VoxdiffError(f"{d} is in use by another {what} (pid {other}); wait for it to finish or choose "
                               "another directory") from None
        stale = os.pread(fd, 256, 0).decode(errors="replace").strip()
        if stale:  # an owner that ended without releasing: killed (the kernel dropped its lock)
            print(f"notice: taking over {d / '.lock'} from pid {stale}, which stopped without releasing it",
                  file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}".encode(), 0)
        remove_leftovers(d)
        try:
            yield d
        except BaseException:
            if remove_created_on_error and created:
                shutil.rmtree(created[-1], ignore_errors=True)  # the outermost directory this call made
            raise
        finally:
            os.ftruncate(fd, 0)  # released cleanly: the next owner sees no stale entry
    finally:
        os.close(fd)


class Progress:
    """Progress of a long loop that tells the truth on a terminal and in logs.

    On a terminal: a tqdm bar. Otherwise (a log file, CI, nohup): a plain line on stderr every `every_s` seconds and
    at the end, so a bar never silently disappears. `log` (a logger) also gets those lines, whatever the terminal.
    With `time_cap_s`, once the measured rate says the cap will stop the loop before `total`, the total shown becomes
    the step the cap will stop at, so the ETA is right.
    """

    def __init__(self, total: int | None, desc: str, *, unit: str = "step", initial: int = 0,
                 time_cap_s: float | None = None, enabled: bool = True, every_s: float = 30.0,
                 log: logging.Logger | None = None, stream: Any = None) -> None:
        self._time = time.monotonic
        self.total, self.desc, self.unit, self.n, self.initial = total, desc, unit, initial, initial
        self.cap, self.every_s, self.log, self.enabled = time_cap_s, every_s, log, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(enabled and getattr(self.stream, "isatty", lambda: False)())
        self.t0 = self._last = self._time()
        self.postfix = ""
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream,
                        disable=not self.tty)

    def shown_total(self) -> int | None:
        """`total`, or the step at which the time cap will stop the loop when that comes first."""
        done, dt = self.n - self.initial, self._time() - self.t0
        if self.cap is None or done <= 0 or dt <= 0:
            return self.total
        at_cap = self.n + int(done / dt * max(0.0, self.cap - dt))
        return at_cap if self.total is None or at_cap < self.total else self.total

    def line(self) -> str:
        dt = self._time() - self.t0
        rate = (self.n - self.initial) / dt if dt > 0 else 0.0
        total = self.shown_total()
        left = (total - self.n) / rate if total is not None and rate > 0 else None
        units = self.unit[:-1] + "ies" if self.unit.endswith("y") else self.unit + "s"
        parts = [f"{self.desc}: {self.n}" + (f"/{total} {units} ({100 * self.n / max(1, total):.0f}%)"
                                             if total else f" {units}"),
                 f"{rate:.2f} {units}/s", f"elapsed {_hms(dt)}"]
        if left is not None:
            parts.append(f"eta {_hms(left)}" + (" (time cap)" if total != self.total else ""))
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if postfix:
            self.postfix = " ".join(f"{k}={v}" for k, v in postfix.items())
        now = self._time()
        if self.tty:
            total = self.shown_total()
            if total != self.bar.total:
                self.bar.total = total
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        if now - self._last >= self.every_s:
            self._last = now
            self._emit()

    def _emit(self) -> None:
        text = self.line()
        if self.log is not None:
            self.log.info("progress %s", text)
        if self.enabled and not self.tty:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            self.bar.close()
        else:
            self.bar.close()
            if self.n > self.initial:
                self._emit()


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def flush_denormals(device: Any) -> None:
    """On CPU, compute with subnormal floats flushed to zero.

    Weights, activations and gradients that drift into the subnormal range make x86 convolution kernels many times
    slower: measured here, an AE training run fell from 5.5 steps/s to under 1 after about 200 steps without this.
    Deterministic; the values it changes are below 1.2e-38. A no-op for other devices.
    """
    import torch  # lazily: see resolve_device

    if torch.device(device).type == "cpu":
        torch.set_flush_denormal(True)
