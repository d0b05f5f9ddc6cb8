"""Host memory reuse for XLA:CPU: keep freed memory in the process instead of mapping it afresh.

XLA:CPU allocates every temporary of a compiled program (activations, gradients, the optimizer's
intermediates) as one block per run: 4.05 GB per ConvViT-B fine-tuning step at batch 8, 224 px.
glibc's malloc serves a block that large with a fresh ``mmap`` and returns it with ``munmap`` when
the run ends, so every step touches 4 GB of new pages: about 1.04 million page faults and 2.2-2.9 s
of kernel time per step on a 2-core AMD EPYC. With ``reuse`` that step ran 1.11x faster and the
ConvMAE-B pretraining step 1.15x (BENCHMARKS.md, "Host memory"). ``reuse`` sets three glibc malloc
options (``mallopt``) so the block comes from the heap and stays there between steps: one arena for
every thread (XLA's worker threads would otherwise use arenas of at most 64 MB, which fall back to
``mmap`` for larger blocks), no ``mmap`` for large blocks, no trimming of the heap's top. The
process then keeps its peak host memory instead of returning it between steps; nothing computed
changes. The heap may still grow during the first steps (a small allocation can take a piece of a
freed block before the block is asked for again); the fine-tuning step's faults fell to zero within
4-6 steps.

It must run before JAX starts its CPU backend (the first ``jax.devices()``, array or compiled
program): glibc gives a thread its arena at the thread's first allocation, and XLA's threads are
made then. Importing jax is fine. ``main.py`` does it first thing, from ``config.host_malloc``:

  "auto"   (default) ``reuse`` when this process can only run on the CPU: ``JAX_PLATFORMS`` names
           cpu alone, or no GPU/TPU plugin of jax is installed (the CPU-only jaxlib of
           requirements.txt); else ``system``. Accelerators keep their memory on the device, and
           a TPU or GPU host's input pipeline keeps its per-thread arenas;
  "reuse"  always (the process is glibc-based Linux; elsewhere it says why it cannot);
  "system" leave malloc as it is.

This module imports nothing heavy, so it can be called before anything else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import pkgutil
import sys

HOST_MALLOC = ("auto", "reuse", "system")

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_ACCELERATOR_PLUGINS = ("cuda", "rocm", "tpu")

_applied: str | None = None      # the log line of the first apply() in this process
_reusing = False                 # whether that call set the options


def check(value) -> str:
  """``value`` if it is one of HOST_MALLOC, else a ValueError naming it and what is accepted."""
  if value not in HOST_MALLOC:
    raise ValueError(f"config.host_malloc={value!r} is not accepted; use 'auto' (reuse freed host "
                     "memory on CPU-only installs), 'reuse' or 'system' (glibc's defaults).")
  return value


def accelerator_plugins() -> list[str]:
  """Names of the installed jax plugins (``jax_plugins.*``) and libtpu that drive a GPU or TPU."""
  found = []
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    found += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)
              if any(k in m.name.lower() for k in _ACCELERATOR_PLUGINS)]
  if importlib.util.find_spec("libtpu") is not None:
    found.append("libtpu")
  return found


def cpu_only(environ=None) -> tuple[bool, str]:
  """(whether this process can only run on the CPU, the reason), without starting JAX."""
  environ = os.environ if environ is None else environ
  platforms = [p.strip().lower() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    if platforms == ["cpu"]:
      return True, "JAX_PLATFORMS=cpu"
    return False, f"JAX_PLATFORMS={environ['JAX_PLATFORMS']}"
  plugins = accelerator_plugins()
  if plugins:
    return False, "jax accelerator plugins installed: " + ", ".join(plugins)
  return True, "no GPU/TPU plugin of jax is installed"


def resolve(value: str, environ=None) -> tuple[str, str]:
  """("reuse" or "system", the reason) for a ``config.host_malloc`` value."""
  check(value)
  if value != "auto":
    return value, f"host_malloc={value!r}"
  only, why = cpu_only(environ)
  return ("reuse" if only else "system"), why


def _libc():
  if not hasattr(ctypes, "CDLL") or os.name != "posix":
    return None, "not a POSIX system"
  libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
  if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
    return None, "the C library is not glibc"
  return libc, ""


def backend_started() -> bool:
  """True once JAX has made a backend in this process (its threads then hold their arenas). Reads
  jax's backend table when jax is imported; never imports or starts it."""
  bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(getattr(bridge, "_backends", None))


def apply(value: str = "auto", environ=None) -> str:
  """Sets the malloc options ``value`` resolves to and returns one line for the log saying what was
  done and why. Call before JAX starts its backend (see the module docstring); later calls in the
  same process only report what the first one did."""
  global _applied, _reusing
  if _applied is not None:
    return _applied
  mode, why = resolve(value, environ)
  if mode == "system":
    _applied = f"host memory: glibc malloc defaults ({why})"
    return _applied
  libc, problem = _libc()
  if libc is None:
    if value == "reuse":
      raise OSError(f"host_malloc='reuse' needs glibc's mallopt: {problem}")
    _applied = f"host memory: system allocator ({problem})"
    return _applied
  late = backend_started()
  if late and value == "auto":
    _applied = ("host memory: glibc malloc defaults (JAX's backend was already running: call "
                "convmae_jax.host_malloc.apply() before the first JAX computation)")
    return _applied
  ok = [libc.mallopt(_M_ARENA_MAX, 1), libc.mallopt(_M_MMAP_MAX, 0),
        libc.mallopt(_M_TRIM_THRESHOLD, -1)]
  if not all(ok):
    raise OSError(f"mallopt refused the host memory options (results {ok})")
  _reusing = True
  _applied = (f"host memory: freed blocks are reused, not unmapped (one malloc arena, no mmap, no "
              f"trimming; {why})")
  if late:
    _applied += ("; JAX's backend was already running, so its threads keep their own arenas and "
                 "large blocks may still be mapped afresh")
  return _applied


def reusing() -> bool:
  """Whether :func:`apply` set the reuse options in this process."""
  return _reusing
