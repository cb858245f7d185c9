"""File helpers: hashing, atomic writes, .npy reading and memmaps, staging directories and directory locks.

Standard library + numpy; imports only voxdiff.errors.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from voxdiff.errors import VoxdiffError


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
