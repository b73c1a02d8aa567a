"""SIGTERM and SIGINT: a stopped command exits 143 / 130, never 0, and says what it kept.

A scheduler that preempts a job sends SIGTERM and reads the exit status; Lightning stops a
fit gracefully on SIGTERM but then exits 0 (its ``SIGTERMException`` is a bare
``SystemExit``), and after Ctrl+C it exits 1. regfit turns both into :class:`Interrupted`,
which :func:`regfit.cli.main` reports in one line and exits with 128 + the signal number,
the status a shell gives a process the signal killed.

Inside a fit Lightning's own handler stops the loop at the next batch (the checkpoint of the
interrupted fit is saved by :class:`~regfit.checkpointing.SafeCheckpoints`); outside a fit
(start-up, between sweep trials, writing results) :func:`stop_on_sigterm` raises
:class:`Interrupted` where the process is, as Python does with ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["Interrupted", "stop_on_sigterm"]


class Interrupted(BaseException):
    """The command was stopped by a signal. A ``BaseException``, like ``KeyboardInterrupt``:
    code that catches ``Exception`` must not swallow a stop request.

    Args:
        signum: the signal (``signal.SIGTERM`` or ``signal.SIGINT``).
        detail: what was kept, e.g. the checkpoint saved, as a sentence.
    """

    def __init__(self, signum: int, detail: str = "") -> None:
        super().__init__(signum, detail)
        self.signum = int(signum)
        self.detail = detail

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + self.signum

    def __str__(self) -> str:
        if not self.detail:
            return f"stopped by {self.signal_name}."
        return f"stopped by {self.signal_name}{' ' if self.detail.startswith('at ') else '; '}{self.detail}"


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Interrupted` — except inside a Lightning
    fit, whose own handler (which calls this one after its own) stops the loop at the next
    batch. Outside the main thread (no signal handlers there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if signal.getsignal(signal.SIGTERM) is not handler:
            return  # Lightning's handler is installed and called us: it stops the fit itself
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
