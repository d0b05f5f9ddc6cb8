"""The host's CPU as benchmarks report it (the model name from /proc/cpuinfo where there is one)."""

from __future__ import annotations

import platform
import sys

from convmae_jax import host_malloc


def add_host_malloc_flag(ap) -> None:
  """``--host_malloc``: the trainer's config.host_malloc (convmae_jax/host_malloc.py), for the
  whole process (the PyTorch twin's allocations included)."""
  ap.add_argument("--host_malloc", default="auto", choices=host_malloc.HOST_MALLOC,
                  help="glibc malloc options set before JAX starts, as the trainer sets them "
                       "(auto: reuse freed host memory on CPU-only installs; system: glibc's "
                       "defaults); the whole process, PyTorch twin included")


def apply_host_malloc(args) -> bool:
  """Applies ``args.host_malloc`` (call before the first JAX computation); prints what was done
  to stderr and returns whether freed memory is reused (for the JSON rows)."""
  print(host_malloc.apply(args.host_malloc), file=sys.stderr, flush=True)
  return host_malloc.reusing()


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
