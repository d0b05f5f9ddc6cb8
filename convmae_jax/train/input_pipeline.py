"""Glue between the host data pipeline (convmae_jax.data) and the devices.

The data pipeline yields dicts of this process's rows as numpy (``image``, and ``label`` for
classification); here every array becomes a globally sharded ``jax.Array`` (batch dimension split
over the mesh), assembled by a background thread that stays ``prefetch`` batches ahead so host-to-device copies overlap
with the step.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding

from convmae_jax.train import sharding as sharding_lib

_END = object()


class DevicePrefetcher:
  """Iterator of ``{name: global jax.Array}`` built from a host iterator of ``{name: np.ndarray}``.

  Images are sent as float32; other arrays keep their dtype. The string features of the examples
  (their TFDS ids and the reasons of bad ones, ``HOST_KEYS``) stay on the host: with the ``bad``
  flags of this process's rows they form the item ``"host"``, a dict of numpy arrays.

  Errors of the host iterator are raised in the consumer at the batch where they happened.
  Call :meth:`close` (or use as a context manager) to stop the thread.
  """

  HOST_KEYS = ("example_id", "bad_reason")
  HOST = "host"

  def __init__(self, host_iter: Iterator[dict], sharding: NamedSharding, prefetch: int = 2):
    self._host_iter = host_iter
    self._sharding = sharding
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="device_prefetch", daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self):
    try:
      for batch in self._host_iter:
        arrays = {k: sharding_lib.to_global_array(
            np.asarray(v, np.float32) if k == "image" else np.asarray(v), self._sharding)
                  for k, v in batch.items() if k not in self.HOST_KEYS}
        if any(k in batch for k in self.HOST_KEYS):
          arrays[self.HOST] = {k: np.asarray(batch[k]) for k in self.HOST_KEYS + ("bad",)
                               if k in batch}
        if not self._put(arrays):
          return
      self._put(_END)
    except BaseException as e:  # handed to the consumer
      self._put(e)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    item = self._queue.get()
    if item is _END:
      self._queue.put(_END)
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    self._stop.set()
    self._thread.join(timeout=5)
    close = getattr(self._host_iter, "close", None)
    if callable(close):
      try:
        close()
      except Exception:  # a finished generator may refuse; nothing to release then
        pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
