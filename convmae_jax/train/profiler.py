"""``config.profile_steps``: a jax.profiler trace of chosen steps."""

from __future__ import annotations

import os

import jax
from absl import logging


class Profiler:
  """``config.profile_steps = (a, b)``: a jax.profiler trace of steps a+1..b into
  ``{workdir}/profile`` (TensorBoard's profile plugin or Perfetto open it); (0, 0) = off."""

  def __init__(self, config, workdir_path):
    steps = tuple(config.get("profile_steps", (0, 0)) or (0, 0))
    self.start, self.stop = (int(steps[0]), int(steps[1])) if len(steps) == 2 else (0, 0)
    self.dir = os.fspath(workdir_path / "profile")
    self.active = False

  def __call__(self, done: int, metrics=None) -> None:
    """Call after step ``done`` was dispatched."""
    if self.stop <= self.start:
      return
    if done == self.start and not self.active:
      jax.profiler.start_trace(self.dir)
      self.active = True
    elif done == self.stop and self.active:
      jax.block_until_ready(metrics)
      jax.profiler.stop_trace()
      self.active = False
      logging.info("Profile of steps %d..%d written to %s.", self.start + 1, self.stop, self.dir)

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
