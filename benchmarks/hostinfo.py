"""The host's CPU as benchmarks report it (the model name from /proc/cpuinfo where there is one)."""

from __future__ import annotations

import platform


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
