"""User errors and how the CLIs report them: VoxdiffError, and run_cli's one-line `prog: error: ...` with exit 2.

Standard library only; a leaf module (imports no other voxdiff module).
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


class VoxdiffError(Exception):
    """An error caused by the user's input (bad file, flag or checkpoint): the CLIs print it as one line and exit 2."""


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
