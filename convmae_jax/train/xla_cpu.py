"""Which library runs the matrix products of a compiled program on XLA:CPU, chosen per program.

XLA:CPU hands dots (and the reductions and elementwise ops around them) to YNNPACK by default
("YNN fusions"); with ``xla_cpu_experimental_ynn_fusion_type`` set to "" it runs them itself
(Eigen's matrix products, XLA's own loop fusions). Neither wins everywhere (2-core AMD EPYC,
BENCHMARKS.md): Eigen runs the forward and input-gradient products of the conv stages (25,088 x
256 x 1,024 at batch 8, 224 px, and the like) in 0.71-0.96x YNNPACK's time, so ConvViT-B's
forward-only programs are faster with it (the linear probe's step 1.07-1.17x, the evaluation
forward 1.07x at batch 4 and 1.10x at batch 8, a tie at batch 2); YNNPACK runs small products
(ConvViT-Tiny at 64 px: 1.4x Eigen's speed), the stage-3 products and the bias-gradient reductions
of a backward pass faster, so the fine-tuning and pretraining steps lose with Eigen (0.92x, 0.89x).

``jax.jit(..., compiler_options=...)`` sets the option for one program, leaving every other
program of the process as XLA_FLAGS (or XLA's defaults) say. ``config.cpu_matmuls``:
  "auto"    (default) Eigen for a float32 program that runs no backward pass through the encoder
            (the linear probe's step, the top-1 and mIoU evaluations, the k-NN monitor's
            embedding) when its stage-1 MLP product per device has at least EIGEN_MIN_PRODUCT
            multiply-adds (ConvViT-B at 224 px: batch 3 and up; UperNet-B's 512-px windows: one),
            else YNNPACK. A bfloat16 program always gets YNNPACK: it has bfloat16 kernels
            (AVX512-BF16 / AMX), Eigen converts to float32 (the linear probe's step 1.7x slower);
  "ynnpack" XLA's default for every program;
  "eigen"   Eigen for every program.
On other backends, and when XLA_FLAGS already sets the option (the user's flags win), nothing is
set. Only the library changes, not the arithmetic: products in the same dtype either way, sums
reordered.
"""

from __future__ import annotations

import os
from typing import Any

import jax

CPU_MATMULS = ("auto", "ynnpack", "eigen")
YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# Multiply-adds of the stage-1 MLP product per device from which "auto" picks Eigen for a
# forward-only program: between ConvViT-B at batch 2 (1.6e9, a tie) and batch 4 (3.3e9, 1.07x).
EIGEN_MIN_PRODUCT = 2 ** 31


def stage1_product(model_config, batch_per_device: int) -> int:
  """Multiply-adds of the encoder's largest matrix product, the stage-1 MLP's (rows = pixels of
  the stride-``patch_sizes[0]`` map of every image on the device), for a ConvMAE/ConvViT config
  or a plan holding one as ``backbone``; 0 for a config without those fields."""
  model_config = getattr(model_config, "backbone", model_config)
  if not all(hasattr(model_config, f) for f in ("img_size", "patch_sizes", "embed_dims",
                                                  "mlp_ratios")):
    return 0
  side = int(model_config.img_size) // int(model_config.patch_sizes[0])
  width = int(model_config.embed_dims[0])
  hidden = int(width * float(model_config.mlp_ratios[0]))
  return int(batch_per_device) * side * side * width * hidden


def compute_dtype(model_config) -> str:
  """The compute dtype name of a model config (or of a plan's ``backbone``); "float32" if unset."""
  return str(getattr(getattr(model_config, "backbone", model_config), "dtype", "float32"))


def check(value: Any) -> str:
  """``value`` if it is one of CPU_MATMULS, else a ValueError naming it and what is accepted."""
  if value not in CPU_MATMULS:
    raise ValueError(f"config.cpu_matmuls={value!r} is not accepted; use 'auto' (Eigen for "
                     "large forward-only programs, YNNPACK for the rest), "
                     "'ynnpack' (XLA's default everywhere) or 'eigen'.")
  return value


def user_flag_set(xla_flags: str | None = None) -> bool:
  """Whether XLA_FLAGS (or ``xla_flags``) sets the YNN fusion option itself."""
  flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  return f"--{YNN_OPTION}" in flags


def resolve(choice: str, *, forward_only: bool, product: int, dtype: str = "float32") -> str:
  """"ynnpack" or "eigen": what ``choice`` means for a program with or without a backward pass
  whose largest product has ``product`` multiply-adds per device (``stage1_product``), computing
  in ``dtype``."""
  check(choice)
  if choice == "auto":
    large = forward_only and product >= EIGEN_MIN_PRODUCT
    return "eigen" if large and str(dtype) == "float32" else "ynnpack"
  return choice


def compiler_options(choice: str, *, forward_only: bool, product: int, dtype: str = "float32",
                     backend: str | None = None,
                     xla_flags: str | None = None) -> dict[str, Any] | None:
  """``jax.jit``'s ``compiler_options`` for one program (None: XLA's defaults / XLA_FLAGS)."""
  library = resolve(choice, forward_only=forward_only, product=product, dtype=dtype)
  backend = jax.default_backend() if backend is None else backend
  if backend != "cpu" or user_flag_set(xla_flags) or library == "ynnpack":
    return None
  return {YNN_OPTION: ""}


def describe(choice: str, *, forward_only: bool, product: int, dtype: str = "float32",
             backend: str | None = None, xla_flags: str | None = None) -> str:
  """One log line: which library the program's matrix products run in, and why."""
  backend = jax.default_backend() if backend is None else backend
  if backend != "cpu":
    return f"matrix products: the {backend} backend's own (config.cpu_matmuls applies to CPU only)"
  if user_flag_set(xla_flags):
    return f"matrix products: as XLA_FLAGS sets --{YNN_OPTION} (config.cpu_matmuls not applied)"
  library = resolve(choice, forward_only=forward_only, product=product, dtype=dtype)
  name = {"eigen": "Eigen (XLA:CPU's own)", "ynnpack": "YNNPACK (XLA:CPU's default)"}[library]
  why = f"config.cpu_matmuls={choice!r}"
  if choice == "auto":
    why += (f", a forward-only {dtype} program, stage-1 product {product:.2e} multiply-adds per "
            "device" if forward_only else ", a program with a backward pass")
  return f"matrix products on CPU: {name} ({why})"


def choose(config, model_config, mesh_shape: tuple[int, int], *, forward_only: bool,
           batch_size: int) -> tuple[dict[str, Any] | None, str]:
  """(compiler_options, log line) for one program of a run: ``config.cpu_matmuls`` (default
  "auto"), the model's config, the mesh's (data, fsdp) shape and the program's global (micro-)batch,
  spread over data x fsdp devices."""
  per_device = max(1, int(batch_size) // (int(mesh_shape[0]) * int(mesh_shape[1])))
  kw = dict(choice=config.get("cpu_matmuls", "auto"), forward_only=forward_only,
            product=stage1_product(model_config, per_device), dtype=compute_dtype(model_config))
  return compiler_options(**kw), describe(**kw)
