"""The metrics window: step metrics stay on the devices until a log step; then one progress line
and one set of TensorBoard scalars. It also watches the run's health: a non-finite loss (stop, skip
or rollback) and the share of undecodable records."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
from absl import logging

from convmae_jax import data
from convmae_jax.train.errors import NonFiniteLossError, RollbackRequest
from convmae_jax.train.logs import in_notebook

BAD_METRIC = "bad_examples"   # undecodable examples replaced in a step's global batch


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def min_examples_for_bad_check(config, n_examples: int | None) -> int:
  """How many examples a run reads before ``config.max_bad_fraction`` is checked: one epoch of the
  split or ``10 / max_bad_fraction``, whichever is fewer (so a few bad records early in the stream
  do not stop a run, and a whole epoch is judged by its true fraction)."""
  fraction = float(config.get("max_bad_fraction", 1.0))
  bound = math.ceil(10.0 / fraction) if fraction > 0 else math.inf
  if n_examples:
    bound = min(bound, int(n_examples))
  return int(bound) if math.isfinite(bound) else int(config.batch_size)


class MetricsWindow:
  """Step metrics stay on the devices until a log step; then one progress line and one set of
  TensorBoard scalars: mean loss and grad norm of the window, lr, img/s (total and per device),
  input wait (share of the time the loop waited for the next batch), ETA, core-hours and epoch.
  Compilation (the first step of a run) is kept out of the throughput.
  """

  def __init__(self, *, writer, total_steps: int, batch_size: int, start_step: int,
               steps_per_epoch: float | None = None, last_checkpoint: Callable[[], str] = lambda: "?",
               label: str = "step", on_log: Callable[[int, dict], None] | None = None,
               nonfinite: str = "stop", max_consecutive_skips: int = 10,
               max_bad_fraction: float = 1.0, bad_examples: int = 0,
               min_examples_for_bad_check: int = 0):
    self.writer = writer
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.steps_per_epoch = steps_per_epoch
    self.last_checkpoint = last_checkpoint
    self.label = label
    self.num_devices = jax.device_count()
    self.pending: list[tuple[int, dict]] = []
    self.window: list[dict] = []
    self.core_hours = 0.0
    self._start, self._first = time.perf_counter(), start_step
    self._input_wait = 0.0
    self._run_start_step = start_step
    self._bar = None
    self.on_log = on_log
    self.nonfinite = nonfinite
    self.max_consecutive_skips = max_consecutive_skips
    self.consecutive_skips = 0
    self.skipped_steps: list[int] = []
    self.rollbacks = 0   # nonfinite="rollback": kept up to date by the loop, shown when non-zero
    # Undecodable examples: the global count (from the step's metrics, carried over a resume by the
    # checkpoint), this process's first few by name, the ones already logged.
    self.bad_examples = int(bad_examples)
    self.max_bad_fraction = float(max_bad_fraction)
    self.min_examples_for_bad_check = int(min_examples_for_bad_check)
    self.fetched_step = start_step
    self.bad_names: list[str] = []
    self._bad_logged: set[bytes] = set()

  def add(self, step: int, metrics: dict) -> None:
    """Records step ``step``'s (device) metrics; times the first step of the run separately."""
    self.pending.append((step, metrics))
    if step == self._run_start_step + 1:
      jax.block_until_ready(metrics)
      logging.info("First step (with compilation) finished after %.1f s.",
                   time.perf_counter() - self._start)
      self.restart(step)

  def restart(self, step: int) -> None:
    """Starts the throughput clock at ``step`` (after the first step, or after an evaluation)."""
    self._start, self._first = time.perf_counter(), step
    self._input_wait = 0.0

  def next_batch(self, batches):
    """``next(batches)``, timing how long the loop waits for it. The window's share of such waits
    is ``input_wait_fraction``: near 0 when the input keeps ahead of the steps, large when the
    accelerator idles for data (more host cores or tf.data threads are needed)."""
    t0 = time.perf_counter()
    batch = next(batches)
    self._input_wait += time.perf_counter() - t0
    return batch

  def fetch(self) -> None:
    """Moves the pending metrics to the host. A non-finite loss raises NonFiniteLossError with
    ``nonfinite="stop"``; with "skip" the (already skipped) step is counted and logged, and more
    than ``max_consecutive_skips`` in a row raise; with "rollback" the first non-finite step raises
    RollbackRequest (the pending steps after it are dropped: the loop replays them)."""
    for s, m in jax.device_get(self.pending):
      self.bad_examples += int(m.pop(BAD_METRIC, 0))
      self.fetched_step = s
      bad = bool(m.get("skipped", 0.0)) or not np.isfinite(m["loss"])
      if bad and self.nonfinite == "rollback":
        self.pending.clear()
        raise RollbackRequest(s, float(m["loss"]), float(m["grad_norm"]))
      if bad and self.nonfinite == "skip":
        self.consecutive_skips += 1
        self.skipped_steps.append(s)
        logging.warning("step %d: loss %s, grad norm %s: the update was skipped (%d in a row; the "
                        "run stops after %d).", s, float(m["loss"]), float(m["grad_norm"]),
                        self.consecutive_skips, self.max_consecutive_skips)
        if self.consecutive_skips > self.max_consecutive_skips:
          raise NonFiniteLossError(
              f"{self.consecutive_skips} consecutive steps up to step {s} had a non-finite loss and "
              f"were skipped; stopping. The last checkpoint is {self.last_checkpoint()}; lower "
              "config.blr, or use config.dtype='float32' if it was bfloat16.")
        continue
      if bad:
        raise NonFiniteLossError(
            f"Loss is {float(m['loss'])} at step {s} (grad norm {float(m['grad_norm'])}, lr "
            f"{float(m['learning_rate']):.3g}); stopping. The last checkpoint is "
            f"{self.last_checkpoint()}; lower config.blr, or use config.dtype='float32' if it was "
            "bfloat16, or --config.nonfinite=skip to skip such steps.")
      self.consecutive_skips = 0
      self.window.append(m)
    self.pending.clear()

  def rewind(self, step: int, *, bad_examples: int) -> None:
    """After a rollback to ``step``: the metrics of later steps are forgotten (they are computed
    again), the count of undecodable examples is the checkpoint's, the clock restarts."""
    self.pending.clear()
    self.window.clear()
    self.consecutive_skips = 0
    self.fetched_step = step
    self.bad_examples = int(bad_examples)
    self.restart(step)

  def note_bad_examples(self, step: int, batch: Mapping[str, Any]) -> None:
    """Logs, once per record, each example of this process's ``batch`` (numpy: ``bad``,
    ``example_id``, ``bad_reason``; the prefetcher's ``"host"`` item) that could not be decoded:
    its TFDS id and the decoder's message."""
    flags = batch.get(data.BAD_KEY)
    if flags is None or not np.any(flags):
      return
    ids, reasons = batch[data.ID_KEY], batch[data.REASON_KEY]
    for i in np.flatnonzero(flags):
      name = bytes(ids[i])
      if name in self._bad_logged:
        continue
      self._bad_logged.add(name)
      text = name.decode(errors="replace")
      if len(self.bad_names) < 5:
        self.bad_names.append(text)
      logging.warning("step %d: example %s cannot be decoded (%s); the mean-colour image replaces "
                      "it.", step, text, bytes(reasons[i]).decode(errors="replace"))

  def bad_records_problem(self) -> str | None:
    """Says so when more than ``max_bad_fraction`` of the examples read so far (all processes,
    all runs of this workdir) were bad, once ``min_examples_for_bad_check`` were read; else None."""
    seen = self.fetched_step * self.batch_size
    if seen < max(1, self.min_examples_for_bad_check):
      return None
    if self.bad_examples <= self.max_bad_fraction * seen:
      return None
    names = ", ".join(self.bad_names) if self.bad_names else "none of them in this process's slice"
    return (f"{self.bad_examples} of the {seen} examples read up to step {self.fetched_step} could "
            f"not be decoded ({self.bad_examples / seen:.3%}, more than max_bad_fraction="
            f"{self.max_bad_fraction:g}); stopping. First ones (TFDS ids): {names}. Repair or "
            "remove these records, or raise --config.max_bad_fraction to go on with the mean-colour "
            "image in their place.")

  def log(self, step: int) -> dict[str, float]:
    """Writes the window's scalars at ``step``, logs the progress line, returns the scalars."""
    self.fetch()
    elapsed = time.perf_counter() - self._start
    steps_timed = step - self._first
    self.core_hours += elapsed * self.num_devices / 3600.0
    w = self.window
    if not w:                          # every step of the window was skipped
      self.restart(step)
      return {"loss": float("nan"), "skipped_steps": float(len(self.skipped_steps)),
              BAD_METRIC: float(self.bad_examples)}
    scalars = {k: float(np.mean([m[k] for m in w])) for k in w[0]
               if k not in ("learning_rate", "skipped")}
    scalars["skipped_steps"] = float(len(self.skipped_steps))
    scalars[BAD_METRIC] = float(self.bad_examples)
    if self.nonfinite == "rollback":
      scalars["rollbacks"] = float(self.rollbacks)
    scalars["learning_rate"] = float(w[-1]["learning_rate"])
    scalars["core_hours"] = self.core_hours
    if self.steps_per_epoch and math.isfinite(self.steps_per_epoch):
      scalars["epoch"] = step / self.steps_per_epoch
    eta = float("nan")
    if steps_timed > 0 and elapsed > 0:
      img_s = steps_timed * self.batch_size / elapsed
      eta = (self.total_steps - step) * self.batch_size / img_s
      scalars.update(images_per_sec=img_s, images_per_sec_per_device=img_s / self.num_devices,
                     eta_hours=eta / 3600.0, input_wait_fraction=min(1.0, self._input_wait / elapsed))
    self.writer.write_scalars(step, scalars)
    extra = "".join(f" | {k} {scalars[k]:.4g}" for k in sorted(w[0])
                    if k not in ("loss", "grad_norm", "learning_rate", "skipped"))
    if self.skipped_steps:
      extra += f" | skipped {len(self.skipped_steps)}"
    if self.bad_examples:
      extra += f" | bad examples {self.bad_examples}"
    if self.rollbacks:
      extra += f" | rollbacks {self.rollbacks}"
    line = (f"{self.label} {step}/{self.total_steps} | loss {scalars['loss']:.4f} | lr "
            f"{scalars['learning_rate']:.3g} | grad_norm {scalars['grad_norm']:.3f}{extra} | "
            f"{scalars.get('images_per_sec', float('nan')):.1f} img/s "
            f"({scalars.get('images_per_sec_per_device', float('nan')):.1f}/device) | input wait "
            f"{100 * scalars.get('input_wait_fraction', float('nan')):.0f}% | eta {format_eta(eta)}")
    self._report(step, line, scalars)
    if self.on_log is not None:
      self.on_log(step, dict(scalars))
    self.window.clear()
    self.restart(step)
    return scalars

  def _report(self, step: int, line: str, scalars: dict) -> None:
    """The progress line: absl INFO under main.py; a progress bar in a notebook; printed when a
    script runs the trainer with absl's INFO lines hidden (outside app.run)."""
    if in_notebook():
      if self._bar is None:
        from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
        self._bar = tqdm(total=self.total_steps, initial=self._run_start_step, desc=self.label,
                         unit="step", dynamic_ncols=True)
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['learning_rate']:.3g}",
                            img_s=f"{scalars.get('images_per_sec', float('nan')):.1f}",
                            refresh=True)
      if step >= self.total_steps:
        self.close()
    elif logging.level_info():
      logging.info("%s", line)
    else:
      print(line, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
