"""How should a long loop report progress so that both a terminal and a log file stay readable?

:func:`progress` returns tqdm when its stream is a terminal (as before), and otherwise a :class:`PlainProgress`
that prints one plain line at most every ``interval_s`` seconds (default 10, or $LENGEN_PROGRESS_INTERVAL), a
line when it starts and ends, and one line per :meth:`~PlainProgress.event` (each evaluation). tqdm redraws
on every step: redirected to a file, the quick preset of lengen-train wrote 176 redraws to its log.

Both share the calls a training loop makes::

    bar = progress(total=steps, initial=step, desc="vsl seed 0")
    bar.set_postfix(loss="2.31"); bar.update(1)
    bar.event("eval", id="0.91", ood="0.12")   # a terminal: into the bar's postfix; a log: its own line
    bar.close()
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO

DEFAULT_INTERVAL_S = 10.0


def _fmt_amount(x: float, unit: str) -> str:
    """An amount of ``unit`` with an SI prefix (``unit`` "B": 12.3 MB)."""
    for prefix in ("", "k", "M", "G", "T"):
        if abs(x) < 1000 or prefix == "T":
            return f"{x:.0f} {prefix}{unit}" if not prefix else f"{x:.1f} {prefix}{unit}"
        x /= 1000.0
    return f"{x} {unit}"


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class PlainProgress:
    """Progress as plain lines, for a stream that is not a terminal (a log file, a pipe, CI)."""

    def __init__(self, total: int | None, *, desc: str = "", initial: int = 0, interval_s: float | None = None,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic, unit: str = "step"):
        self.unit = unit  # "step": counts of steps (it/s); anything else: amounts with SI prefixes ("B": MB/s)
        if interval_s is None:
            interval_s = float(os.environ.get("LENGEN_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S))
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0 seconds, got {interval_s}")
        self.total, self.desc, self.n, self.interval_s = total, desc, initial, interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.postfix: dict[str, str] = {}
        self._start = self._last = clock()
        self._start_n = self._last_n = initial
        self._closed = False
        self._line(f"start at {self._amount(initial)}" + (f" of {self._amount(total, bare=True)}" if total is not None else ""))

    def _amount(self, x, bare: bool = False) -> str:
        if self.unit == "step":
            return str(x) if bare else f"step {x}"
        return _fmt_amount(x, self.unit)

    def _line(self, text: str) -> None:
        prefix = f"[{self.desc}] " if self.desc else ""
        self.stream.write(prefix + text + "\n")
        self.stream.flush()

    def _status(self) -> str:
        now = self.clock()
        elapsed = now - self._start
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [self._amount(self.n) + (f"/{self._amount(self.total, bare=True)} ({100.0 * self.n / self.total:.0f}%)"
                                         if self.total else "")]
        speed = f"{rate:.2f} it/s" if self.unit == "step" else f"{_fmt_amount(rate, self.unit)}/s"
        parts.append(f"{speed}, elapsed {_fmt_time(elapsed)}")
        if self.total and rate > 0:
            parts.append(f"eta {_fmt_time((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(" ".join(f"{k}={v}" for k, v in self.postfix.items()))
        return " | ".join(parts)

    def set_postfix(self, **values) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self._last >= self.interval_s:
            self._last, self._last_n = now, self.n
            self._line(self._status())

    def event(self, what: str, **values) -> None:
        """A line of its own, now (an evaluation's results); the values also join the postfix."""
        self.postfix.update({k: str(v) for k, v in values.items()})
        detail = " ".join(f"{k}={v}" for k, v in values.items())
        self._line(f"{self._amount(self.n)}: {what}" + (f" {detail}" if detail else ""))

    def write(self, text: str) -> None:
        self._line(text)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._line("done: " + self._status())

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Tqdm:
    """tqdm with :meth:`event` (into the postfix, as the bar showed evaluations before)."""

    def __init__(self, bar):
        self.bar = bar

    def __getattr__(self, name):
        return getattr(self.bar, name)

    def event(self, what: str, **values) -> None:
        post = dict(getattr(self.bar, "_lengen_postfix", {}))
        post.update(values)
        self.bar._lengen_postfix = post
        self.bar.set_postfix(**post)

    def set_postfix(self, **values) -> None:
        self.bar._lengen_postfix = dict(values)
        self.bar.set_postfix(**values)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


class _Off:
    """Disabled progress: every call does nothing."""
    n = 0

    def set_postfix(self, **values) -> None: ...
    def update(self, n: int = 1) -> None: ...
    def event(self, what: str, **values) -> None: ...
    def write(self, text: str) -> None: ...
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None: ...


def progress(total: int | None = None, *, desc: str = "", initial: int = 0, enabled: bool = True,
             stream: TextIO | None = None, interval_s: float | None = None, tty: bool | None = None,
             unit: str = "step"):
    """tqdm on a terminal, :class:`PlainProgress` elsewhere, nothing when ``enabled`` is False.

    stream: where progress goes (default sys.stderr, as tqdm). tty: override the stream's isatty().
    unit: "step" (counts), or a unit whose amounts get SI prefixes, e.g. "B" for bytes.
    """
    if not enabled:
        return _Off()
    stream = stream if stream is not None else sys.stderr
    if tty is None:
        isatty = getattr(stream, "isatty", None)
        tty = bool(isatty and isatty())
    if tty:
        from tqdm.auto import tqdm
        scaled = {} if unit == "step" else {"unit": unit, "unit_scale": True}
        return _Tqdm(tqdm(total=total, initial=initial, desc=desc, file=stream, dynamic_ncols=True, leave=False,
                          **scaled))
    return PlainProgress(total, desc=desc, initial=initial, interval_s=interval_s, stream=stream, unit=unit)
