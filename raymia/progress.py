"""The one progress/ETA reporter: ``[label] done/total (pct) elapsed Ns eta Ns extra``.

Library loops call a :class:`Progress` as ``progress(step, total, metrics)``; the Ray
actors and Tune callbacks format their lines with :func:`line` so that every stage of
every pipeline prints the same readable line."""
from __future__ import annotations

import sys
import time
from typing import Callable

ProgressFn = Callable[[int, int, dict], None]


def _metrics(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def line(label: str, done: int, total: int, elapsed: float, new: int = -1, extra: str = "") -> str:
    """One progress line.  ``new`` is how many of ``done`` were done in ``elapsed`` (the
    rest were finished before, e.g. by an earlier run); -1 = all of them."""
    new = done if new < 0 else new
    eta = elapsed / new * (total - done) if new > 0 else float("nan")
    pct = 100 * done / max(total, 1)
    s = f"[{label}] {done}/{total} ({pct:.0f}%) elapsed {elapsed:.0f}s eta {eta:.0f}s"
    return f"{s} {extra}".rstrip()


class Progress:
    """Prints a :func:`line` at most every ``every_s`` seconds (and at the end)."""

    def __init__(self, label: str, every_s: float = 10.0, stream=None):
        self.label, self.every_s, self.t0, self.last = label, every_s, time.time(), 0.0
        self.stream = stream or sys.stdout

    def __call__(self, step: int, total: int, metrics: dict) -> None:
        now = time.time()
        if step < total and now - self.last < self.every_s:
            return
        self.last = now
        print(line(self.label, step, total, now - self.t0, extra=_metrics(metrics)), file=self.stream, flush=True)


def quiet(step: int, total: int, metrics: dict) -> None:
    """A progress function that prints nothing."""
