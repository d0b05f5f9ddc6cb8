"""Stop requests: SIGTERM, Ctrl-C or a pod preemption notice finish the step, checkpoint, and stop."""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
from absl import logging


class StopRequest:
  """SIGTERM / Ctrl-C / a pod preemption notice → finish the step, checkpoint, and stop.

  Single process: Python handlers set a flag (a second signal acts as usual). Several processes:
  all of them must stop at the same step, which JAX's preemption sync point decides (via Orbax).
  Use as a context manager around the loop.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
    logging.warning("%s received: stopping after this step with a checkpoint.", self.signal_name)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def requested(self, step: int, ckpt_mgr) -> str | None:
    if jax.process_count() > 1:
      return "preemption" if ckpt_mgr.reached_preemption(step) else None
    return self.signal_name
