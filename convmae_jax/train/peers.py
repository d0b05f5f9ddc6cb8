"""A bound on how long the survivors of a multi-process run wait for a process that died.

Every process runs :class:`PeerWatchdog` around its training loop. A background thread writes a
counter into the key-value store of ``jax.distributed`` (``convmae/heartbeat/{process}``) every
``interval`` seconds and reads everyone's; a second thread checks, twice a second, when each peer's
counter last moved. When a peer's counter has not moved for ``timeout_s`` seconds, or the store
itself has not answered for ``timeout_s`` seconds, the process prints::

    error: lost process K (no heartbeat for S s); last checkpoint: step M in DIR

and ends at once with exit status 5 (``os._exit``: a survivor may be blocked inside a collective
that never returns, where neither an exception nor a normal exit can get through). So no survivor
waits longer than about ``timeout_s`` (plus the 0.5 s of the check) for a lost peer, whatever it was
doing: a step, a collective, a checkpoint barrier.

When process 0 dies, the store dies with it; JAX's own client then aborts every survivor at once
(measured: 0.5 s after a SIGKILL, SIGABRT, "Terminating process because the JAX distributed service
detected fatal errors ... the leader task was preempted/died"), before this bound, and that abort
cannot be intercepted from Python: that case has JAX's message. The "store not answering" branch
below stays as the backstop.

A process that finishes the loop writes ``done``, so a peer that takes longer over its last step
or checkpoint is not taken for lost. JAX's own heartbeat (``jax.distributed.initialize(
heartbeat_timeout_seconds=...)``) is set longer than this bound by ``main.py``, so this message
comes first.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

import jax

from convmae_jax.train.errors import BadRecordsError, ConfigError, NonFiniteLossError

EXIT_STATUS = 5
_PREFIX = "convmae/heartbeat/"
_DONE = "done"


def _client():
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.client


class PeerWatchdog:
  """Context manager; does nothing in a single-process run or without ``jax.distributed``.

  ``last_checkpoint()`` returns the text after "last checkpoint: " (e.g. ``"step 40 in DIR"``); it
  is called only when a peer is lost. ``exit`` ends the process (tests may replace it).
  """

  def __init__(self, timeout_s: float, last_checkpoint: Callable[[], str], *,
               exit: Callable[[int], None] = os._exit):
    self.timeout_s = float(timeout_s)
    self.interval = max(0.2, min(1.0, self.timeout_s / 10.0))
    self.last_checkpoint = last_checkpoint
    self._exit = exit
    self._stop = threading.Event()
    self._threads: list[threading.Thread] = []
    self.active = jax.process_count() > 1 and _client() is not None
    self.lost: str | None = None

  # ------------------------------------------------------------------------------- threads
  def _beat(self):
    client, me = _client(), jax.process_index()
    count = 0
    while not self._stop.is_set():
      count += 1
      try:
        client.key_value_set(f"{_PREFIX}{me}", str(count), allow_overwrite=True)
        values = dict(client.key_value_dir_get(_PREFIX))
        now = time.monotonic()
        with self._lock:
          self._answered = now
          for key, value in values.items():
            pid = int(key.rsplit("/", 1)[-1])
            if pid == me:
              continue
            if value == _DONE:
              self._done.add(pid)
            if self._seen.get(pid) != value:
              self._seen[pid] = value
              self._moved[pid] = now
      except Exception:  # noqa: BLE001 - the store is unreachable: the check below decides
        pass
      self._stop.wait(self.interval)

  def _check(self):
    me = jax.process_index()
    while not self._stop.wait(0.5):
      now = time.monotonic()
      with self._lock:
        if now - self._answered > self.timeout_s:
          lost, since = 0, now - self._answered
        else:
          stale = [(now - t, pid) for pid, t in self._moved.items()
                   if pid != me and pid not in self._done and now - t > self.timeout_s]
          if not stale:
            continue
          since, lost = max(stale)
      self._fire(lost, since)
      return

  def _fire(self, process: int, since: float):
    try:
      where = self.last_checkpoint()
    except Exception as e:  # noqa: BLE001 - the message must still go out
      where = f"unknown ({type(e).__name__}: {e})"
    self.lost = (f"lost process {process} (no heartbeat for {since:.0f} s); last checkpoint: "
                 f"{where}")
    print(f"error: {self.lost}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    self._exit(EXIT_STATUS)

  # ----------------------------------------------------------------------- context manager
  def __enter__(self):
    if not self.active:
      return self
    now = time.monotonic()
    self._lock = threading.Lock()
    self._answered = now
    self._seen: dict[int, str] = {}
    self._done: set[int] = set()
    self._moved = {pid: now for pid in range(jax.process_count())}
    for target, name in ((self._beat, "peer_heartbeat"), (self._check, "peer_watchdog")):
      thread = threading.Thread(target=target, name=name, daemon=True)
      thread.start()
      self._threads.append(thread)
    return self

  def __exit__(self, exc_type, exc, tb):
    if not self.active:
      return False
    if exc_type is not None and not _is_clean_stop(exc):
      # An error out of a collective is often the first sign of a dead peer: give the check the
      # time to tell (it ends the process if so) before the error goes on.
      deadline = time.monotonic() + self.timeout_s + 2 * self.interval + 1.0
      while time.monotonic() < deadline and self.lost is None and self._threads[1].is_alive():
        time.sleep(0.2)
    self._stop.set()
    try:
      _client().key_value_set(f"{_PREFIX}{jax.process_index()}", _DONE, allow_overwrite=True)
    except Exception:  # noqa: BLE001 - the store may be gone already
      pass
    for thread in self._threads:
      thread.join(timeout=2 * self.interval + 1.0)
    return False


def _is_clean_stop(exc) -> bool:
  """Errors every process raises at the same step (a config refusal, a non-finite loss, too many
  bad records): no reason to wait for a verdict on the peers."""
  return isinstance(exc, (ConfigError, NonFiniteLossError, BadRecordsError, KeyboardInterrupt))


def jax_heartbeat_timeout(peer_timeout_s: float) -> int:
  """The heartbeat timeout to give ``jax.distributed.initialize``: longer than the watchdog's
  bound, so the watchdog's message (naming the lost process) comes before JAX's own abort."""
  return int(max(100, 2 * float(peer_timeout_s) + 30))


def finished_steps_text(checkpoint_dir) -> Callable[[], str]:
  """``last_checkpoint`` for :class:`PeerWatchdog`: the newest finished step in ``checkpoint_dir``,
  read from the folder names alone (no Orbax manager, no collective: the peers may be gone)."""
  from etils import epath  # pylint: disable=import-outside-toplevel

  def text() -> str:
    path = epath.Path(checkpoint_dir)
    steps = []
    if path.exists():
      for child in path.iterdir():
        if child.name.isdigit() and (not str(path).startswith("gs://")
                                     or (child / "commit_success.txt").exists()):
          steps.append(int(child.name))
    return f"step {max(steps)} in {path}" if steps else f"none in {path}"
  return text
