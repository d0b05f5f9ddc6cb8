"""Building blocks of ConvMAE / ConvViT: initializers, primitives (LayerNorm, Linear, the patch and
depthwise convs, DropPath, grad_barrier) and the conv side (PatchEmbed, CBlock), NHWC throughout.
The transformer side (attention, Block) is `transformer.py`.

Numerics follow the official PyTorch model (see README, "Parity"): exact-erf GELU, LayerNorm with a
two-pass biased variance computed in float32, eps 1e-5 in patch embeddings and conv blocks and 1e-6
in transformer blocks. Parameters are float32; `dtype` is the compute dtype of matmuls and convs.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx

from convmae_jax.models import dwconv

Initializer = Callable[..., jax.Array]
_INV_SQRT2 = 1.0 / math.sqrt(2.0)


class FrozenPosEmbed(nnx.Variable):
  """A fixed (not trained) position embedding. Kept as state so checkpoints round-trip exactly,
  but outside `nnx.Param`, so optimizers built with `wrt=nnx.Param` never see it."""


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU written as 0.5·x·(1+erf(x/√2)) (the erfc-based jax.nn.gelu is slower on XLA:CPU).

  A bfloat16 x is computed in float32 and rounded once, as PyTorch's bfloat16 GELU is: XLA:CPU
  would round after every operation, which made the bfloat16 GELU backward 4.5x slower than the
  float32 one in the fine-tuning step (BENCHMARKS.md, "bfloat16 GELU and depthwise-conv taps in
  float32").
  """
  if x.dtype == jnp.bfloat16:
    return gelu(x.astype(jnp.float32)).astype(x.dtype)
  return 0.5 * x * (1.0 + lax.erf(x * _INV_SQRT2))


# ------------------------------------------------------------------------------------------------
# Initializers matching the PyTorch ones in distribution.
# ------------------------------------------------------------------------------------------------

def uniform(bound: float) -> Initializer:
  """U(-bound, bound)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def torch_default(fan_in: int) -> Initializer:
  """PyTorch's default Conv2d/Linear init: kaiming_uniform(a=√5) == U(±1/√fan_in), same for bias."""
  return uniform(1.0 / math.sqrt(fan_in))


def xavier_uniform(fan_in: int, fan_out: int) -> Initializer:
  """U(±√(6/(fan_in+fan_out))) with fans given explicitly (PyTorch's 2-D view of the weight)."""
  return uniform(math.sqrt(6.0 / (fan_in + fan_out)))


def normal(std: float) -> Initializer:
  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.normal(key, shape, dtype)
  return init


def zeros(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


# ------------------------------------------------------------------------------------------------
# Primitive layers.
# ------------------------------------------------------------------------------------------------

def _layer_norm_stats(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(x - mean, mean, 1/sqrt(var + eps)) over the last axis, x float32: two-pass biased variance."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  centered = x - mean
  var = jnp.mean(centered * centered, axis=-1, keepdims=True)
  return centered, mean, lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """LayerNorm over the last axis in float32: (x - mean) · rsqrt(var + eps) · scale + bias.

  The backward pass is written out (the textbook form every fused LayerNorm kernel uses): it keeps
  x, the row means and the row rsqrt (no normalised copy of x), and computes
  dx = rsqrt · (g - mean(g) - x̂ · mean(g · x̂)) with g = dy · scale, dscale = Σ dy · x̂,
  dbias = Σ dy. XLA's own derivative of the forward kept x̂ and broadcast copies of scale and
  rsqrt as full-size arrays on XLA:CPU (BENCHMARKS.md, "Written backward passes"). Same values up
  to float reordering.
  """
  centered, _, rs = _layer_norm_stats(x.astype(jnp.float32), eps)
  return centered * rs * scale + bias


def _layer_norm_fwd(x, scale, bias, eps):
  centered, mean, rs = _layer_norm_stats(x.astype(jnp.float32), eps)
  return centered * rs * scale + bias, (x, mean, rs, scale)


def _layer_norm_bwd(eps, res, dy):
  del eps
  x, mean, rs, scale = res
  x_hat = (x.astype(jnp.float32) - mean) * rs
  dy = dy.astype(jnp.float32)
  g = dy * scale
  mean_g = jnp.mean(g, axis=-1, keepdims=True)
  mean_gx = jnp.mean(g * x_hat, axis=-1, keepdims=True)
  dx = rs * (g - mean_g - x_hat * mean_gx)
  rows = tuple(range(dy.ndim - 1))
  return (dx.astype(x.dtype), jnp.sum(dy * x_hat, axis=rows).astype(scale.dtype),
          jnp.sum(dy, axis=rows).astype(scale.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, computed in float32 (`layer_norm`), output in the compute
  dtype."""

  def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.scale[...], self.bias[...], float(self.eps)).astype(self.dtype)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int],
         batched: bool = False) -> jax.Array:
  """``lax.dot_general`` contracting axis ``contract[0]`` of a with ``contract[1]`` of b (with
  ``batched``: all but the last two axes of both are batch axes), in the operands' dtype.

  bfloat16 operands are multiplied into a float32 result that is then rounded: the value XLA
  computes for a bfloat16 product anyway (it accumulates in float32), but asked this way XLA:CPU
  gives the product to YNNPACK's bfloat16 kernels (AVX512-BF16 / AMX) instead of converting both
  operands to float32 first (BENCHMARKS.md, "bfloat16 on CPU")."""
  batch = tuple(range(a.ndim - 2)) if batched else ()
  dims = (((contract[0],), (contract[1],)), (batch, batch))
  if a.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16:
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
  return lax.dot_general(a, b, dims)


def _transposed_copy(a: jax.Array) -> jax.Array:
  """a (..., m, n) transposed to (..., n, m) and stored so, for a product to read row-major.

  A bare transpose reaches XLA with a permuted layout, which XLA folds into the product (a form
  that YNNPACK does not take, and for bfloat16 operands a conversion of both to float32); the
  reshape through an added unit axis, behind a barrier, makes it a row-major copy."""
  t = jnp.swapaxes(a, -1, -2)
  shape = t.shape
  return lax.optimization_barrier(t.reshape(*shape[:-1], 1, shape[-1])).reshape(shape)


@jax.custom_vjp
def _matmul_cpu(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _dot(x, kernel, (x.ndim - 1, 0))


def _matmul_cpu_fwd(x, kernel):
  return _matmul_cpu(x, kernel), (x, kernel)


def _kernel_grad_transposes_x(fan_in: int, fan_out: int) -> bool:
  """Which operand the kernel gradient's transposed copy is made of: the narrower one (one copy,
  and the product's output keeps the wider axis minor). A square kernel's is dy: XLA folds x's
  producer into the transposing copy and recomputes it there, reading it transposed, and x is
  often the costly one (a conv block's conv2 reads the depthwise conv's 25 taps: 120-140 ms of
  thread time per stage-1 block in the fine-tuning step, BENCHMARKS.md "Square kernels'
  gradients")."""
  return fan_in < fan_out


def _matmul_cpu_bwd(res, dy):
  x, kernel = res
  fan_in, fan_out = kernel.shape
  dx = _dot(dy, kernel, (dy.ndim - 1, 1))
  rows_x, rows_dy = x.reshape(-1, fan_in), dy.reshape(-1, fan_out)
  if _kernel_grad_transposes_x(fan_in, fan_out):
    dk = _dot(_transposed_copy(rows_x), rows_dy, (1, 0))
  else:
    dk_t = lax.optimization_barrier(_dot(_transposed_copy(rows_dy), rows_x, (1, 0)))
    dk = _kernel_grad_back(dk_t)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


def _kernel_grad_back(dk_t: jax.Array) -> jax.Array:
  """The (fan_out, fan_in) product dyᵀ·x turned into the kernel gradient (fan_in, fan_out), stored
  row-major once. A bare ``.T`` reaches XLA as a permuted layout that it folds into every
  consumer: the optimizer's moment updates and the gradient norm then each read the gradient
  transposed, several times slower than a contiguous read (BENCHMARKS.md, "The kernel gradient
  stored once")."""
  return dwconv.fusion_break(dk_t.T)


_matmul_cpu.defvjp(_matmul_cpu_fwd, _matmul_cpu_bwd)


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x (..., in) @ kernel (in, out), the product of every `Linear` and `PatchConv`.

  On XLA:CPU the kernel gradient (Σ over rows of xᵀ·dy) is written out: XLA hands that product,
  whose operands are both transposed, to Eigen; as a transposed copy of the narrower operand and a
  plain product it runs in YNNPACK, 3-25% faster per product at ConvViT-B's shapes
  (BENCHMARKS.md, "Written backward passes"). bfloat16 operands are multiplied into float32
  results rounded to bfloat16 (`_dot`), forward and backward, so XLA:CPU runs them in YNNPACK's
  bfloat16 kernels. Other backends use ``x @ kernel`` and XLA's own derivative. Same values up to
  float reordering.
  """
  if jax.default_backend() != "cpu":
    return x @ kernel
  dtype = jnp.result_type(x, kernel)          # as ``@`` promotes mixed operands
  return _matmul_cpu(x.astype(dtype), kernel.astype(dtype))


@jax.custom_vjp
def _batched_matmul_bf16(a: jax.Array, b: jax.Array) -> jax.Array:
  return _dot(a, b, (a.ndim - 1, b.ndim - 2), batched=True)


def _batched_matmul_bf16_fwd(a, b):
  return _batched_matmul_bf16(a, b), (a, b)


def _batched_matmul_bf16_bwd(res, g):
  a, b = res
  da = _dot(g, b, (g.ndim - 1, b.ndim - 1), batched=True)        # (..., m, n)·(..., k, n)ᵀ
  db = _dot(_transposed_copy(a), g, (a.ndim - 1, g.ndim - 2), batched=True)  # (.., m, k)ᵀ·(.., m, n)
  return da, db


_batched_matmul_bf16.defvjp(_batched_matmul_bf16_fwd, _batched_matmul_bf16_bwd)


def batched_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """a (..., m, k) @ b (..., k, n) with the same leading axes: attention's two products.

  On XLA:CPU with bfloat16 operands, the product and its two gradient products are asked for as
  float32 results rounded to bfloat16 (`_dot`), so they run in YNNPACK's bfloat16 kernels; the
  values are those of ``a @ b`` and its autodiff up to float reordering. Elsewhere ``a @ b``.
  """
  if jax.default_backend() == "cpu" and a.dtype == b.dtype == jnp.bfloat16:
    return _batched_matmul_bf16(a, b)
  return a @ b


@jax.custom_vjp
def _add_bias_bf16(y: jax.Array, bias: jax.Array) -> jax.Array:
  return y + bias


def _add_bias_bf16_fwd(y, bias):
  return _add_bias_bf16(y, bias), None


def _add_bias_bf16_bwd(_, dy):
  rows = dy.reshape(-1, dy.shape[-1]).astype(jnp.float32)
  return dy, jnp.sum(rows, axis=0).astype(dy.dtype)


_add_bias_bf16.defvjp(_add_bias_bf16_fwd, _add_bias_bf16_bwd)


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y (..., C) + bias (C,) in y's dtype: the bias of every `Linear`, `PatchConv` and
  `DepthwiseConv`.

  On XLA:CPU with a bfloat16 y, the bias gradient (dy summed over every axis but the last) is
  written as a float32 sum over the rows of dy reshaped to (rows, C), rounded to bfloat16.
  Autodiff's sum over several axes of a bfloat16 array runs in XLA:CPU as a tree of
  reduce-windows that adds in bfloat16: 35x slower at (8, 56, 56, 1024), and off by up to 55 where
  the exact sum is 360 (the written sum: 1, the bfloat16 rounding); BENCHMARKS.md, "bfloat16 on
  CPU". Elsewhere ``y + bias``.
  """
  bias = bias.astype(y.dtype)
  if jax.default_backend() == "cpu" and y.dtype == jnp.bfloat16:
    return _add_bias_bf16(y, bias)
  return y + bias


class Linear(nnx.Module):
  """y = x @ kernel + bias with kernel (in, out). Also serves as 1×1 conv on NHWC maps."""

  def __init__(self, in_features: int, out_features: int, *, kernel_init: Initializer,
               bias_init: Initializer = zeros, dtype=jnp.float32, rngs: nnx.Rngs):
    self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features)))
    self.bias = nnx.Param(bias_init(rngs.params(), (out_features,)))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return add_bias(y, self.bias[...])


class PatchConv(nnx.Module):
  """Conv with kernel = stride = `patch`, no padding, kernel stored HWIO (p, p, in, out).

  Computed as a space-to-depth reshape and one matmul, which is exactly the convolution because
  the windows do not overlap.
  """

  def __init__(self, in_channels: int, out_channels: int, patch: int, *, kernel_init: Initializer,
               bias_init: Initializer, dtype=jnp.float32, rngs: nnx.Rngs):
    self.kernel = nnx.Param(kernel_init(rngs.params(), (patch, patch, in_channels, out_channels)))
    self.bias = nnx.Param(bias_init(rngs.params(), (out_channels,)))
    self.patch = patch
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    p = self.patch
    x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, h // p, w // p, p * p * c).astype(self.dtype)
    kernel = self.kernel[...].reshape(p * p * c, -1).astype(self.dtype)
    return add_bias(matmul(x, kernel), self.bias[...])


class DepthwiseConv(nnx.Module):
  """5×5 depthwise conv (named `attn` inside CBlock, as in the official model), zero padding; the
  forms and their backward passes are in `dwconv.py`."""

  def __init__(self, channels: int, kernel_size: int = 5, *, impl: str = "auto",
               dtype=jnp.float32, rngs: nnx.Rngs):
    init = torch_default(kernel_size * kernel_size)  # fan_in = in/groups · k · k
    self.kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, 1, channels)))
    self.bias = nnx.Param(init(rngs.params(), (channels,)))
    self.impl = impl
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """'SAME' zero-padded conv of a map x (N, H, W, C)."""
    x = x.astype(self.dtype)
    kernel = self.kernel[...].astype(self.dtype)
    if dwconv.resolve_dwconv_impl(self.impl) == "shift":
      y = dwconv.depthwise_conv_shift(x, kernel)
    else:
      y = dwconv.depthwise_conv_lax(x, kernel)
    return add_bias(y, self.bias[...])

  def valid(self, windows: jax.Array) -> jax.Array:
    """'VALID' conv of halo windows (..., f+K-1, f+K-1, C) → (..., f, f, C)."""
    windows = windows.astype(self.dtype)
    kernel = self.kernel[...].astype(self.dtype)
    k = kernel.shape[0]
    lead, (wh, ww, c) = windows.shape[:-3], windows.shape[-3:]
    fh, fw = wh - k + 1, ww - k + 1
    flat = windows.reshape((-1, wh, ww, c))
    if dwconv.resolve_dwconv_impl(self.impl) == "shift":
      y = dwconv.depthwise_conv_valid(flat, kernel).reshape(lead + (fh, fw, c))
    else:
      y = lax.conv_general_dilated(flat, kernel, (1, 1), "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   feature_group_count=c).reshape(lead + (fh, fw, c))
    return add_bias(y, self.bias[...])


@jax.custom_vjp
def _grad_barrier(x: jax.Array) -> jax.Array:
  return x


_grad_barrier.defvjp(lambda x: (x, None), lambda _, g: (dwconv.fusion_break(g),))


def grad_barrier(x: jax.Array) -> jax.Array:
  """The identity, whose backward pass stops XLA:CPU from fusing the cotangent chain of the
  residual stream into every consumer (it recomputed it there, at a cost quadratic in depth).
  Used at block inputs and at the depthwise-conv input; a no-op on other backends, where a
  conditional would cost a host round trip."""
  if jax.default_backend() != "cpu":
    return x
  return _grad_barrier(x)


class DropPath(nnx.Module):
  """Stochastic depth per sample (timm semantics): x / keep · floor(keep + U[0,1)).

  Active unless `deterministic` (set by `model.eval()`); randomness from the `dropout` stream.
  """

  def __init__(self, rate: float, *, rngs: nnx.Rngs, deterministic: bool = False):
    self.rate = float(rate)
    self.deterministic = deterministic
    self.rngs = rngs["dropout"].fork() if self.rate > 0 else nnx.data(None)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.rate == 0.0 or self.deterministic:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    u = jax.random.uniform(self.rngs(), shape, jnp.float32)
    return x / keep * jnp.floor(keep + u).astype(x.dtype)


# ------------------------------------------------------------------------------------------------
# Composite blocks.
# ------------------------------------------------------------------------------------------------

class PatchEmbed(nnx.Module):
  """Conv(k = s = patch) → LayerNorm(eps 1e-5) → GELU, NHWC in and out."""

  def __init__(self, in_channels: int, out_channels: int, patch: int, *,
               kernel_init: Initializer | None = None, dtype=jnp.float32, rngs: nnx.Rngs):
    fan_in = in_channels * patch * patch
    self.proj = PatchConv(in_channels, out_channels, patch,
                          kernel_init=kernel_init or torch_default(fan_in),
                          bias_init=torch_default(fan_in), dtype=dtype, rngs=rngs)
    self.norm = LayerNorm(out_channels, 1e-5, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return gelu(self.norm(self.proj(x)))


class ConvMlp(nnx.Module):
  """Per-pixel MLP of the conv blocks: 1×1 conv → GELU → 1×1 conv (PyTorch-default init)."""

  def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.fc1 = Linear(dim, hidden, kernel_init=torch_default(dim), bias_init=torch_default(dim),
                      dtype=dtype, rngs=rngs)
    self.fc2 = Linear(hidden, dim, kernel_init=torch_default(hidden),
                      bias_init=torch_default(hidden), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(gelu(self.fc1(x)))


class CBlock(nnx.Module):
  """Convolutional block of stages 1–2 with the masked 5×5 depthwise conv.

  x = x + conv2(dwconv(visible · conv1(LN(x)))); x = x + mlp(LN(x)). The visible mask (1 = visible)
  is multiplied in after conv1 (bias included) and before the depthwise conv, the only op here that
  mixes positions, so masked pixels never reach visible ones.
  """

  def __init__(self, dim: int, mlp_ratio: float, *, drop_path: float = 0.0,
               dwconv_impl: str = "auto", norm_eps: float = 1e-5, dtype=jnp.float32,
               rngs: nnx.Rngs):
    # norm_eps: 1e-5 in the pretraining/classification/segmentation code, 1e-6 in the ViTDet port.
    self.norm1 = LayerNorm(dim, norm_eps, dtype=dtype)
    self.conv1 = Linear(dim, dim, kernel_init=torch_default(dim), bias_init=torch_default(dim),
                        dtype=dtype, rngs=rngs)
    self.attn = DepthwiseConv(dim, 5, impl=dwconv_impl, dtype=dtype, rngs=rngs)
    self.conv2 = Linear(dim, dim, kernel_init=torch_default(dim), bias_init=torch_default(dim),
                        dtype=dtype, rngs=rngs)
    self.norm2 = LayerNorm(dim, norm_eps, dtype=dtype)
    self.mlp = ConvMlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    self.drop_path = DropPath(drop_path, rngs=rngs)

  def __call__(self, x: jax.Array, visible: jax.Array | None = None, *,
               halo: Callable[[jax.Array], jax.Array] | None = None,
               groups: jax.Array | None = None) -> jax.Array:
    """x (N,H,W,C); visible (N,H,W,1) with 1 = visible, or None (no masking).

    With `halo`, x holds only the visible cells (N, K, f, f, C) and `halo` maps them to their
    zero-filled (f+4)² neighbourhoods, so the depthwise conv sees exactly what it sees on the
    masked full map (see `visible.py`).

    With `groups` (N,H,W,G), disjoint 0/1 masks covering the map (FastConvMAE's complementary
    masks), each position gets the depthwise conv of its own group only: Σ_g m_g·dwconv(m_g·y).
    """
    x = grad_barrier(x)
    y = self.conv1(self.norm1(x))
    if visible is not None:
      y = y * visible.astype(y.dtype)
    y = grad_barrier(y)
    if groups is not None:
      m = jnp.moveaxis(groups.astype(y.dtype), -1, 0)[..., None]          # (G, N, H, W, 1)
      per_group = self.attn((y[None] * m).reshape((-1,) + y.shape[1:])).reshape(m.shape[:4] + y.shape[-1:])
      y = jnp.sum(per_group * m, axis=0)
    elif halo is None:
      y = self.attn(y)
    else:
      y = self.attn.valid(halo(y))
    y = self.conv2(y)
    x = x + self.drop_path(y)
    return x + self.drop_path(self.mlp(self.norm2(x)))
