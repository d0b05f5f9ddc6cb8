"""Console logging: this project's lines stay, the INFO chatter of JAX, TFDS, Orbax and clu goes;
and whether the run is inside a notebook (where the progress line becomes a progress bar)."""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import logging

_PROJECT_PATHS = (os.sep + "convmae_jax" + os.sep, os.sep + "main.py")
# Library warnings that say nothing a user can act on.
_NOISE = ("has no dataset_info.json",)


class _QuietLibraries(std_logging.Filter):
  """Keeps this project's INFO lines and every library's warnings and errors; drops the INFO
  chatter of JAX, TFDS, Orbax and clu (backend probing, dataset info, checkpoint internals)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    path = record.pathname or ""
    if any(p in path for p in _PROJECT_PATHS):
      return True
    if record.levelno < std_logging.WARNING:
      return False
    return not any(n in record.getMessage() for n in _NOISE)


def quiet_library_logs() -> None:
  """Installs the filter on absl's handler (and the root logger's handlers), so records of every
  logger that reaches the console pass it. TensorFlow's C++ INFO lines are hidden as well."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  handlers = [logging.get_absl_handler()] + list(std_logging.getLogger().handlers)
  for handler in handlers:
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
      handler.addFilter(_QuietLibraries())


def in_notebook() -> bool:
  """True inside a Jupyter/Colab kernel (where absl's log lines are not shown by default)."""
  shell = sys.modules.get("IPython")
  try:
    return shell is not None and "ipykernel" in sys.modules and \
        shell.get_ipython() is not None and hasattr(shell.get_ipython(), "kernel")
  except Exception:  # noqa: BLE001 - any doubt: not a notebook
    return False
