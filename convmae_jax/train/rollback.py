"""``config.nonfinite = "rollback"``: a non-finite loss or gradient norm sends the run back to its last
checkpoint instead of ending it.

(The issue calls this ``nonfinite_policy="rollback"``; the config field has always been
``nonfinite``, so "rollback" is its third value beside "stop" and "skip".)

What a rollback does, in the loop (``loop._steps``) and here:

* the metrics window raises :class:`RollbackRequest` at the first non-finite step it fetches (every
  ``log_every_steps``, before every evaluation and before every checkpoint, so no checkpoint ever
  holds a non-finite value and the last one is always finite);
* the parameters, optimizer state and the rest of the model state are restored from the latest
  checkpoint (or rebuilt as at step 0 when the run has none yet: the initial state is a function of
  the seed and ``init_from``), the data pipeline is rebuilt at that step, the metrics window and the
  evaluators take back the checkpoint's counts, and the steps after it run again;
* with ``rollback_fp32_steps = k > 0`` on a bfloat16 run the next ``k`` steps after the restored
  checkpoint run in float32 (a second step, compiled on first use from the float32 model graph;
  parameters are float32 in both, so it takes the same state), then bfloat16 again;
* one warning line names the bad step, the checkpoint restored and what changed; the count goes to
  TensorBoard (``rollbacks``), to the progress line and to every checkpoint's meta (``rollbacks``,
  with ``rollback_fp32_until``, the last step of a float32 window, so a run killed inside that
  window resumes it and repeats the losses of the run that rolled back);
* ``max_rollbacks`` rollbacks in a row (no checkpoint written in between) are tried; a non-finite
  loss after them ends the run with NonFiniteLossError (exit status 3), as ``"stop"`` does.

Random numbers come from ``fold_in(seed, step)`` and the data is positioned by step, so a replay in
the same dtype repeats the losses the run would have had: a one-time fault leaves no trace in the
losses after it.
"""

from __future__ import annotations

from typing import Any, Callable

from absl import logging

from convmae_jax.train.errors import NonFiniteLossError, RollbackRequest

# Checkpoint meta fields.
META_COUNT = "rollbacks"                 # rollbacks so far, all runs of this workdir
META_FP32_UNTIL = "rollback_fp32_until"  # steps <= this one run in float32 (0: none)


class Rollback:
  """The rollback state of a run: counts, the float32 window, and how to go back.

  ``restore(step) -> (params, opt_state, rest, meta)`` reads a checkpoint of the run;
  ``initial_state() -> (params, opt_state, rest)`` builds the state of step 0;
  ``build_fp32_step() -> step`` compiles the float32 step (called once, on first use).
  """

  def __init__(self, *, dtype: str, fp32_steps: int, max_rollbacks: int,
               restore: Callable[[int], tuple], initial_state: Callable[[], tuple],
               build_fp32_step: Callable[[], Callable], writer: Any, meta: dict | None = None):
    self.dtype = dtype
    self.fp32_steps = int(fp32_steps)
    self.max_rollbacks = int(max_rollbacks)
    self._restore = restore
    self._initial_state = initial_state
    self._build_fp32_step = build_fp32_step
    self._fp32_step = None
    self.writer = writer
    meta = meta or {}
    self.total = int(meta.get(META_COUNT, 0))              # carried over a resume
    self.fp32_until = int(meta.get(META_FP32_UNTIL, 0))    # a float32 window a resume continues
    self.in_a_row = 0                                      # since the last checkpoint written
    self.events: list[tuple[int, int]] = []                # (bad step, restored step), this run

  def step_for(self, done: int, train_step: Callable) -> Callable:
    """The step function that computes step ``done``: float32 inside the window, else
    ``train_step`` (the config's dtype)."""
    if done > self.fp32_until or self.dtype == "float32":
      return train_step
    if self._fp32_step is None:
      logging.info("Building the float32 step for steps up to %d.", self.fp32_until)
      self._fp32_step = self._build_fp32_step()
    return self._fp32_step

  def meta(self) -> dict:
    """The fields of every checkpoint's meta."""
    return {META_COUNT: self.total, META_FP32_UNTIL: self.fp32_until}

  def saved(self) -> None:
    """A checkpoint was written: the next rollback is the first in a row again."""
    self.in_a_row = 0

  def __call__(self, bad: RollbackRequest, latest_step: int | None, checkpoint_dir) -> tuple:
    """Goes back from the non-finite step ``bad.step`` to the checkpoint ``latest_step`` (None:
    the initial state of step 0). Returns ``(params, opt_state, rest, meta, restored_step)``;
    raises NonFiniteLossError when ``max_rollbacks`` in a row were already tried."""
    restored = 0 if latest_step is None else int(latest_step)
    where = (f"the checkpoint of step {restored} in {checkpoint_dir}" if latest_step is not None
             else "the initial state of step 0 (no checkpoint yet)")
    last = (f"step {restored} in {checkpoint_dir}" if latest_step is not None
            else "none (no checkpoint was written yet)")
    if self.in_a_row >= self.max_rollbacks:
      raise NonFiniteLossError(
          f"Loss is {bad.loss} at step {bad.step} (grad norm {bad.grad_norm}) after "
          f"{self.in_a_row} rollback{'' if self.in_a_row == 1 else 's'} in a row to {where} "
          f"(max_rollbacks={self.max_rollbacks}); "
          f"stopping. The last checkpoint is {last}; lower "
          "config.blr, or set --config.rollback_fp32_steps to at least checkpoint_every_steps so "
          "the replay passes the bad step in float32, or use config.dtype='float32'.")
    if latest_step is None:
      params, opt_state, rest = self._initial_state()
      meta: dict = {}
    else:
      params, opt_state, rest, meta = self._restore(restored)
    self.in_a_row += 1
    self.total += 1
    self.events.append((bad.step, restored))
    if self.fp32_steps and self.dtype != "float32":
      self.fp32_until = restored + self.fp32_steps
      changed = (f"steps {restored + 1}..{self.fp32_until} run in float32, then {self.dtype} "
                 "again")
      if self.fp32_until < bad.step:
        changed += f" (the float32 steps end before step {bad.step})"
    else:
      self.fp32_until = 0
      changed = ("nothing else changed (already float32)" if self.dtype == "float32" and
                 self.fp32_steps else "nothing else changed (rollback_fp32_steps=0)")
    self.writer.write_scalars(bad.step, {META_COUNT: float(self.total)})
    logging.warning("step %d: loss %s, grad norm %s: rolled back to %s, data from step %d; %s. "
                    "Rollback %d of at most %d in a row, %d in all.", bad.step, bad.loss,
                    bad.grad_norm, where, restored, changed, self.in_a_row, self.max_rollbacks,
                    self.total)
    return params, opt_state, rest, meta, restored
