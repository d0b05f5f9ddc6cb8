"""Epochs to steps, and the learning-rate schedule: how long a run is, how long it warms up, where
this invocation stops."""

from __future__ import annotations

import math

from convmae_jax import data
from convmae_jax.train import optim
from convmae_jax.train.errors import ConfigError


def num_train_examples(config) -> int:
  """Examples in the training split: from the dataset's info, else ``config.num_train_examples``."""
  n = config.get("num_train_examples", -1)
  if n and n > 0:
    return int(n)
  try:
    return int(data.num_examples(config.dataset, split=config.train_split,
                                 data_dir=config.get("data_dir") or None))
  except (FileNotFoundError, ValueError):  # missing dataset / bad split: data's message says it all
    raise
  except Exception as e:  # the info is needed only to turn epochs into steps
    raise ConfigError(
        f"Could not read the number of examples of {config.dataset!r} split "
        f"{config.train_split!r} ({type(e).__name__}: {e}); set config.num_train_examples, or "
        "config.num_train_steps instead of num_epochs.") from e


def schedule_lengths(config, n_examples: int | None) -> tuple[int, float, float]:
  """(total_steps, warmup_steps, steps_per_epoch) for the config's epochs or explicit step count."""
  steps_per_epoch = (n_examples / config.batch_size) if n_examples else float("nan")
  if config.num_train_steps != -1:
    total = int(config.num_train_steps)
  else:
    total = int(math.ceil(config.num_epochs * steps_per_epoch))
  if config.get("warmup_steps", -1) != -1:
    warmup = float(config.warmup_steps)
  else:
    warmup = config.warmup_epochs * steps_per_epoch
  if not math.isfinite(warmup):
    raise ConfigError("config.warmup_epochs needs the dataset size; set config.warmup_steps or "
                      "config.num_train_examples.")
  return total, min(warmup, float(total)), steps_per_epoch


def resolve_schedule(config) -> tuple[int | None, int, float, float]:
  """(n_examples or None, total_steps, warmup_steps, steps_per_epoch); reads the dataset size only
  when epochs are used."""
  needs_size = config.num_train_steps == -1 or (config.get("warmup_steps", -1) == -1
                                                and config.warmup_epochs)
  try:
    n_examples = num_train_examples(config)
  except ValueError:
    if needs_size:
      raise
    n_examples = None  # only used to report epochs
  total, warmup, per_epoch = schedule_lengths(config, n_examples)
  return n_examples, total, warmup, per_epoch


def make_schedule(config, total_steps: int, warmup_steps: float):
  peak = optim.peak_learning_rate(config.blr, config.batch_size)
  return optim.warmup_cosine_schedule(peak_lr=peak, warmup_steps=warmup_steps,
                                      total_steps=total_steps, min_lr=config.get("min_lr", 0.0))


def end_step(config, total_steps: int) -> int:
  """The step this run stops at: ``total_steps``, or ``config.stop_after_steps`` when earlier."""
  stop_after = config.get("stop_after_steps", -1)
  return min(total_steps, stop_after) if stop_after and stop_after > 0 else total_steps
