"""The 5×5 depthwise conv of the conv blocks as functions: the K² shifted multiply-adds (the fast
form on XLA:CPU) with their backward pass written out, and XLA's grouped convolution (the fast form
on GPU/TPU). `layers.DepthwiseConv` picks one (`dwconv_impl`); README "Performance notes" and
BENCHMARKS.md have the measurements behind each choice. NHWC maps, HWIO kernels (K, K, 1, C).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def fusion_break(a: jax.Array) -> jax.Array:
  """The identity, as a conditional whose branches are both the identity: XLA cannot fuse through
  a conditional, so `a` is computed once and stored (optimization_barrier does not do this on
  XLA:CPU, which removes barriers before fusion)."""
  return jax.lax.cond(jnp.isfinite(a.reshape(-1)[0]), lambda v: v, lambda v: v + 0, a)


def _valid_taps(xp: jax.Array, kernel: jax.Array) -> jax.Array:
  """'VALID' depthwise conv of (M, H+K-1, W+K-1, C) as K² shifted multiply-adds → (M, H, W, C).

  bfloat16 operands are multiplied and summed in float32 and the sum rounded once (as oneDNN's
  bfloat16 depthwise conv accumulates); XLA:CPU would round each of the K² products and partial
  sums, 3x slower than the float32 conv (BENCHMARKS.md, "bfloat16 GELU and depthwise-conv taps
  in float32").
  """
  if xp.dtype == jnp.bfloat16:
    return _valid_taps(xp.astype(jnp.float32), kernel.astype(jnp.float32)).astype(xp.dtype)
  k = kernel.shape[0]
  h, w = xp.shape[1] - k + 1, xp.shape[2] - k + 1
  out = None
  for i in range(k):
    for j in range(k):
      term = xp[:, i:i + h, j:j + w, :] * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def _pad_hw(x: jax.Array, pad: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def _shift_taps(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'SAME' depthwise conv as K² shifted multiply-adds over one zero-padded copy (one fusion)."""
  return _valid_taps(_pad_hw(x, kernel.shape[0] // 2), kernel)


def _kernel_grad_taps(xp: jax.Array, g: jax.Array, kernel: jax.Array) -> jax.Array:
  """d(sum(g · valid_taps(xp, kernel))) / d kernel: K² products summed over (M, H, W)."""
  k = kernel.shape[0]
  h, w = g.shape[1], g.shape[2]
  dk = jnp.stack([jnp.stack([jnp.sum(xp[:, i:i + h, j:j + w, :] * g, axis=(0, 1, 2))
                             for j in range(k)]) for i in range(k)])
  return dk[:, :, None, :].astype(kernel.dtype)


def _diagonal_sums(p: jax.Array, k: int) -> jax.Array:
  """p (C, W+k-1, W) → (k, C): row j is Σ_w p[:, w+j, w], read as strided slices of each flat
  (W+k-1)·W block (entry (w+j, w) sits at j·W + w·(W+1))."""
  c, v, w = p.shape
  flat = p.reshape(c, v * w)
  return jnp.stack([jnp.sum(lax.slice(flat, (0, j * w), (c, j * w + (w - 1) * (w + 1) + 1),
                                      (1, w + 1)), axis=1) for j in range(k)])


def rows_parallel(y: jax.Array) -> jax.Array:
  """The identity, written as max(y, the minimum of y's last axis): every entry is at least its
  row's minimum, so the values are y's exactly (a row holding a NaN becomes all NaN).

  Applied to a batched product on XLA:CPU, it makes YNNPACK run the product on every core: a
  batched product alone runs there on one thread, while a product fused with a reduction over its
  rows is split over the batch and runs on all of them (BENCHMARKS.md, "Cores kept busy; batched
  products on every core")."""
  return jnp.maximum(y, jnp.min(y, axis=-1, keepdims=True))


def _kernel_grad(xp: jax.Array, g: jax.Array, kernel: jax.Array) -> jax.Array:
  """The same kernel gradient as `_kernel_grad_taps`, as K batched matmuls over channels.

  Per kernel row i and channel c, P = X_i·Gᵀ contracts the (H, M) positions of the padded input's
  rows i..i+H with those of the output gradient, giving every (input column, output column)
  product sum; tap (i, j) is the sum of P's j-th diagonal. The taps form has XLA:CPU write out
  each of the K² shifted slices of the padded input before its reduction (and, in a training
  step, share them with the forward pass's identical slices); this form writes the input once,
  transposed, and K row slices of it (BENCHMARKS.md: the conv's forward + backward 1.10x at
  ConvViT-B's stage 1, equal at stage 2; the fine-tuning step 1.02x). Both operands keep the
  contracted (H, M) axis minor, the form YNNPACK takes, and on XLA:CPU each product goes through
  `rows_parallel` so that it runs on every core (stage 1 of ConvViT-B at batch 8: 1.69x the
  product with the rows contracted, which XLA gave to Eigen on one thread).
  """
  k = kernel.shape[0]
  m, h, w, c = g.shape
  wp = w + k - 1
  cpu = jax.default_backend() == "cpu"
  xt = jnp.transpose(xp, (3, 2, 1, 0))                           # (C, W+k-1, H+k-1, M)
  gt = jnp.transpose(g, (3, 2, 1, 0)).reshape(c, w, h * m)       # (C, W, H·M)
  if cpu:
    # Transposed once and stored: otherwise XLA fuses the transposes into each of the K products'
    # operands, K strided transposing copies of the whole map.
    xt, gt = fusion_break(xt), fusion_break(gt)
  rows = []
  for i in range(k):
    xi = xt[:, :, i:i + h].reshape(c, wp, h * m)
    p = lax.dot_general(xi, gt, (((2,), (2,)), ((0,), (0,))),
                        precision=lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)      # (C, W+k-1, W)
    rows.append(_diagonal_sums(rows_parallel(p) if cpu else p, k))
  return jnp.stack(rows)[:, :, None, :].astype(kernel.dtype)


# Autodiff of the taps makes XLA:CPU pad the K² shifted output gradients and add them into the
# input gradient one full-map pass at a time (48 passes per CBlock pair in the fine-tuning step,
# a quarter of its time); written out, the input gradient is the same shifted conv of the output
# gradient with the kernel flipped: one fusion, like the forward.
@jax.custom_vjp
def depthwise_conv_shift(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'SAME' depthwise conv as K² shifted multiply-adds. x (N,H,W,C), kernel (K,K,1,C), K odd.

  Equal to lax.conv with feature_group_count=C; about 20× faster on XLA:CPU, where grouped
  convolutions take a slow generic path. Its backward pass is written out (see above).
  """
  return _shift_taps(x, kernel)


def _shift_fwd(x, kernel):
  return _shift_taps(x, kernel), (x, kernel)


def _shift_bwd(res, g):
  x, kernel = res
  return (_shift_taps(g, kernel[::-1, ::-1]),
          _kernel_grad(_pad_hw(x, kernel.shape[0] // 2), g, kernel))


depthwise_conv_shift.defvjp(_shift_fwd, _shift_bwd)


@jax.custom_vjp
def depthwise_conv_valid(windows: jax.Array, kernel: jax.Array) -> jax.Array:
  """'VALID' depthwise conv of (M, f+K-1, f+K-1, C) windows → (M, f, f, C), K² shifted
  multiply-adds with the backward written out as for :func:`depthwise_conv_shift` (the input
  gradient is the full correlation of the output gradient with the flipped kernel)."""
  return _valid_taps(windows, kernel)


def _valid_fwd(windows, kernel):
  return _valid_taps(windows, kernel), (windows, kernel)


def _valid_bwd(res, g):
  windows, kernel = res
  k = kernel.shape[0]
  return (_valid_taps(_pad_hw(g, k - 1), kernel[::-1, ::-1]), _kernel_grad(windows, g, kernel))


depthwise_conv_valid.defvjp(_valid_fwd, _valid_bwd)


def depthwise_conv_lax(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'SAME' depthwise conv through lax.conv_general_dilated (the fast path on GPU/TPU)."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def resolve_dwconv_impl(impl: str) -> str:
  """'auto' picks 'shift' on CPU and 'lax' on accelerators."""
  if impl == "auto":
    return "shift" if jax.default_backend() == "cpu" else "lax"
  return impl
