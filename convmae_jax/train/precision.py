"""The compute dtype a config asks for: ``config.dtype`` "auto", "float32" or "bfloat16".

Parameters, optimizer state, LayerNorm, softmax and the loss stay float32 either way; the dtype is
that of the products and activations. bfloat16 is the fast one where the hardware computes in it
(TPU, GPU, x86 CPUs with AVX512-BF16 or AMX) and the slow one where it does not: a CPU without
bfloat16 arithmetic widens every product to float32 and rounds back, so the ConvMAE-B pretraining
step took 1.36x as long in bfloat16 as in float32 on a 2-core AMD EPYC with AVX2 only, while on
one with AVX512-BF16 bfloat16 was 1.37x faster (BENCHMARKS.md). ``"auto"`` (the recipes' default)
picks:

  "bfloat16"  when this process may run on a GPU or TPU (``JAX_PLATFORMS`` names another platform
              than cpu, or a GPU/TPU plugin of jax is installed: ``host_malloc.cpu_only``), or on a
              CPU whose ``/proc/cpuinfo`` flags list ``avx512_bf16`` or ``amx_bf16``;
  "float32"   on every other CPU (AVX2-only x86, Arm, or a system without ``/proc/cpuinfo``).

It is decided without starting JAX's backend, so it can be part of the config checks. Each process
decides for itself: a multi-host CPU run over machines of different kinds should set the dtype.
"""

from __future__ import annotations

from convmae_jax import host_malloc

DTYPES = ("auto", "float32", "bfloat16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
  """The x86 feature flags of the first processor in ``cpuinfo``; None where there is no such
  file or flags line (macOS, Windows, Arm)."""
  try:
    with open(cpuinfo, encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    return None
  return None


def resolve(value: str, *, environ=None, cpuinfo: str = "/proc/cpuinfo") -> tuple[str, str]:
  """("float32" or "bfloat16", the reason) for a ``config.dtype`` value; a ValueError naming a
  value that is not one of DTYPES."""
  if value not in DTYPES:
    raise ValueError(f"config.dtype={value!r} is not accepted; use one of {list(DTYPES)}.")
  if value != "auto":
    return value, f"config.dtype={value!r}"
  only, why = host_malloc.cpu_only(environ)
  if not only:
    return "bfloat16", f"config.dtype='auto': {why}"
  flags = cpu_flags(cpuinfo)
  found = sorted(set(BF16_CPU_FLAGS) & (flags or set()))
  if found:
    return "bfloat16", f"config.dtype='auto': CPU only, and this CPU has {', '.join(found)}"
  return "float32", ("config.dtype='auto': CPU only, and this CPU has no bfloat16 arithmetic "
                     f"({' or '.join(BF16_CPU_FLAGS)}), where bfloat16 is slower than float32")
