"""Errors the trainer raises for user input."""


class ConfigError(ValueError):
  """A config value that is not accepted, found before any compute; the message names the value
  and what would be accepted."""
