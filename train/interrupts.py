"""SIGTERM and SIGINT (Ctrl-C) for the training job.

Two phases, both installed by :class:`Interrupts` (main thread only):

* start-up (:meth:`Interrupts.startup`, data loading, model build, restore, first compile):
  a signal raises :class:`Interrupted`; the job prints one line and exits cleanly (nothing was
  trained, nothing is saved).
* training (:meth:`Interrupts.training`): the first signal only sets :attr:`Interrupts.stop`;
  the loop finishes the current step, saves a checkpoint and returns. A second SIGINT exits at
  once (status 130) without saving.

Example::

  with Interrupts() as sig:
    sig.startup()
    ...                     # may raise Interrupted
    sig.training()
    loop.train(..., stop=sig.stop)
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Self

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
  """A SIGTERM or SIGINT arrived during start-up; ``signame`` says which."""

  def __init__(self, signame: str):
    super().__init__(signame)
    self.signame = signame


class StopEvent(threading.Event):
  """A ``threading.Event`` that also records which signal set it (``signame``)."""

  def __init__(self):
    super().__init__()
    self.signame: str | None = None


class Interrupts:
  """Installs SIGTERM/SIGINT handlers for its ``with`` block (restores the old ones after).

  Attributes:
    stop: set by the first signal of the training phase; ``stop.signame`` names it
      (``"SIGTERM"`` or ``"SIGINT"``).
  """

  def __init__(self):
    self.stop = StopEvent()
    self._previous: dict[int, object] = {}
    self._active = threading.current_thread() is threading.main_thread()

  def __enter__(self) -> Self:
    if self._active:
      self._previous = {s: signal.getsignal(s) for s in _SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _install(self, handler) -> None:
    if self._active:
      for s in _SIGNALS:
        signal.signal(s, handler)

  def startup(self) -> None:
    """Start-up phase: a signal raises :class:`Interrupted`."""

    def raise_(signum, frame):
      raise Interrupted(signal.Signals(signum).name)

    self._install(raise_)

  def training(self) -> None:
    """Training phase: the first signal sets :attr:`stop`; a second SIGINT exits at once."""

    def flag(signum, frame):
      name = signal.Signals(signum).name
      if self.stop.is_set():
        if signum == signal.SIGINT:
          os.write(2, b"\nsecond SIGINT: exiting now without saving\n")
          os._exit(130)
        return
      self.stop.signame = name
      self.stop.set()
      os.write(
        2,
        f"\n{name}: finishing the current step, then saving a checkpoint and stopping "
        f"(Ctrl-C again exits at once without saving)\n".encode(),
      )

    self._install(flag)
