"""Stop on a signal: `StopOnSignal` turns SIGTERM / SIGINT (a preemption, a Ctrl-C) into a flag
that a loop reads at its next boundary, so it can finish what it was doing and write its state.

    with signals.StopOnSignal() as stop:
      while ...:
        ...
        if stop.requested:
          break
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Iterable

logger = logging.getLogger(__name__)


class StopOnSignal:
  """Installs a handler for `signals` that sets `requested`; the previous handlers come back on
  exit. Outside the main thread (where Python allows no handler) it installs nothing and
  `requested` stays False. A second SIGINT raises KeyboardInterrupt (a user giving up on the
  orderly stop) when `second_interrupt_raises`. `message`, when given, is logged at each
  signal, with %d for its number."""

  def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT), *,
               message: str | None = None, second_interrupt_raises: bool = True):
    self.signals = tuple(signals)
    self.message = message
    self.second_interrupt_raises = second_interrupt_raises
    self.requested = False
    self._previous: dict[int, object] = {}

  def __enter__(self) -> "StopOnSignal":
    if threading.current_thread() is threading.main_thread():
      for sig in self.signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT and self.second_interrupt_raises:
      raise KeyboardInterrupt
    if self.message:
      logger.warning(self.message, signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
