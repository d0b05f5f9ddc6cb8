"""The errors a run ends with, each mapped by ``main.py`` to its exit status and printed without a
traceback: a config value that is not accepted (2), a non-finite loss (3), too many undecodable
records (4)."""


class ConfigError(ValueError):
  """A config value that is not accepted, found before any compute; the message names the value
  and what would be accepted."""


class NonFiniteLossError(FloatingPointError):
  """A non-finite training loss; the message names the step and the last checkpoint."""


class RollbackRequest(NonFiniteLossError):
  """``config.nonfinite="rollback"``: the metrics window met a non-finite loss or gradient norm at
  ``step``. The loop catches it and goes back to the last checkpoint (``train/rollback.py``); were
  it ever left uncaught it would end the run like any NonFiniteLossError (exit status 3)."""

  def __init__(self, step: int, loss: float, grad_norm: float):
    super().__init__(f"Loss is {loss} at step {step} (grad norm {grad_norm}).")
    self.step, self.loss, self.grad_norm = int(step), float(loss), float(grad_norm)


class BadRecordsError(RuntimeError):
  """More than ``config.max_bad_fraction`` of the examples read could not be decoded; the message
  names some of them and the checkpoint written at the stop."""
