"""Logging and progress: file loggers (get_logger) and the Progress bar/lines of long loops.

Standard library + tqdm; a leaf module (imports no other voxdiff module).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


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
        self.time_cap_s, self.every_s, self.log, self.enabled = time_cap_s, every_s, log, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(enabled and getattr(self.stream, "isatty", lambda: False)())
        self.t0 = self._last = self._time()
        self.postfix = ""
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream,
                        disable=not self.tty)

    def shown_total(self) -> int | None:
        """`total`, or the step at which the time cap will stop the loop when that comes first."""
        done, dt = self.n - self.initial, self._time() - self.t0
        if self.time_cap_s is None or done <= 0 or dt <= 0:
            return self.total
        at_cap = self.n + int(done / dt * max(0.0, self.time_cap_s - dt))
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
