"""The errors a run ends with, each mapped by ``main.py`` to its exit status and printed without a
traceback: a config value that is not accepted (2), a non-finite loss (3), too many undecodable
records (4)."""


class ConfigError(ValueError):
  """A config value that is not accepted, found before any compute; the message names the value
  and what would be accepted."""


class NonFiniteLossError(FloatingPointError):
  """A non-finite training loss; the message names the step and the last checkpoint."""


class BadRecordsError(RuntimeError):
  """More than ``config.max_bad_fraction`` of the examples read could not be decoded; the message
  names some of them and the checkpoint written at the stop."""
