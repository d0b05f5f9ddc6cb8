"""The transformer side of ConvMAE / ConvViT, (B, L, D) tokens: multi-head self-attention with its
three implementations (explicit matmuls, `jax.nn.dot_product_attention` with XLA or cuDNN) and
relative-position terms (BEiT table, ViTDet decomposed), the MLP, window partitioning, and the
pre-norm Block of stage 3, the decoder and the windowed backbones. Primitives (Linear, LayerNorm,
DropPath, GELU, grad_barrier, initializers) come from `layers`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convmae_jax.models.layers import (DropPath, Initializer, LayerNorm, Linear, batched_matmul,
                                       gelu, grad_barrier)


def _relative_offsets(size: int) -> np.ndarray:
  """(size, size) int32: q - k + size - 1, the row of a (2·size − 1)-entry table."""
  r = np.arange(size)
  return (r[:, None] - r[None, :] + size - 1).astype(np.int32)


def table_bias(table: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """BEiT/Swin relative position bias of a (gh, gw) token grid → (heads, gh·gw, gh·gw).

  table: ((2gh−1)·(2gw−1), heads); entry for query (y1, x1), key (y2, x2) is row
  (y1−y2+gh−1)·(2gw−1) + (x1−x2+gw−1). Gathered as two small 1-D lookups instead of a
  (L, L) index array (which at a 64×64 grid would be a 64 MiB constant).
  """
  gh, gw = grid
  heads = table.shape[-1]
  t = table.reshape(2 * gh - 1, 2 * gw - 1, heads)
  b = jnp.take(t, _relative_offsets(gh), axis=0)            # (y1, y2, 2gw−1, heads)
  b = jnp.take(b, _relative_offsets(gw), axis=2)            # (y1, y2, x1, x2, heads)
  return b.transpose(4, 0, 2, 1, 3).reshape(heads, gh * gw, gh * gw)


def decomposed_bias(scores: jax.Array | None, q: jax.Array, rel_pos_h: jax.Array,
                    rel_pos_w: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """ViTDet's decomposed relative position: scores (B, heads, L, L) + q·R_h + q·R_w, float32.

  q (B, heads, L, hd) unscaled; rel_pos_h (2gh−1, hd), rel_pos_w (2gw−1, hd) (sizes equal to the
  grid, so no table resampling); the row term is broadcast over key columns and the column term
  over key rows, added in that order as the official code does. With scores None the result is the
  bias alone, q·R_h + q·R_w (B, heads, L, L), for attention that adds its bias itself.
  """
  gh, gw = grid
  b, n, length, hd = q.shape
  r_h = jnp.take(rel_pos_h, _relative_offsets(gh), axis=0).astype(q.dtype)   # (gh, kh, hd)
  r_w = jnp.take(rel_pos_w, _relative_offsets(gw), axis=0).astype(q.dtype)   # (gw, kw, hd)
  r_q = q.reshape(b, n, gh, gw, hd)
  rel_h = jnp.einsum("bnhwc,hkc->bnhwk", r_q, r_h).astype(jnp.float32)
  rel_w = jnp.einsum("bnhwc,wkc->bnhwk", r_q, r_w).astype(jnp.float32)
  if scores is None:
    s = rel_h[..., :, None] + rel_w[..., None, :]
  else:
    s = scores.reshape(b, n, gh, gw, gh, gw) + rel_h[..., :, None] + rel_w[..., None, :]
  return s.reshape(b, n, length, length)


@jax.custom_vjp
def softmax_keep_output(x: jax.Array) -> jax.Array:
  """jax.nn.softmax over the last axis (the same forward values), whose backward keeps only the
  output: dx = y·(dy − Σ dy·y). Autodiff of jax.nn.softmax keeps exp(x − max) as well, a second
  (…, L, L) tensor per attention layer (805 MB per global block at a 64×64 grid, 12 heads)."""
  return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x):
  y = jax.nn.softmax(x, axis=-1)
  return y, y


def _softmax_bwd(y, g):
  return (y * (g - jnp.sum(g * y, axis=-1, keepdims=True)),)


softmax_keep_output.defvjp(_softmax_fwd, _softmax_bwd)


def _split_qkv(qkv: jax.Array) -> list[jax.Array]:
  """The fused projection's output (…, 3·D), [q|k|v] on the last axis, as q, k, v (…, D) each.

  `jnp.split` rather than indexing a (…, 3, heads, hd) reshape: the gradient of a split is one
  concatenation, that of three indexings three zero-padded copies of the (…, 3·D) array added up
  (about 10% of a ConvViT-B stage-3 attention's forward + backward on XLA:CPU, BENCHMARKS.md)."""
  return jnp.split(qkv, 3, axis=-1)


def _exact_power_of_two(scale: float) -> bool:
  """True when multiplying by `scale` only shifts the exponent (head_dim 4, 16, 64, 256, ...)."""
  mantissa, _ = math.frexp(scale)
  return mantissa == 0.5


ATTENTION_IMPLS = ("auto", "explicit", "xla", "cudnn")


def _cudnn_device_problem() -> str | None:
  """Why the default device cannot run cuDNN flash attention, or None when it can."""
  backend = jax.default_backend()
  if backend != "gpu":
    return f"the default JAX backend is {backend!r}, not a CUDA GPU"
  device = jax.devices()[0]
  version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
  if "rocm" in version:
    return "the GPU is a ROCm device (cuDNN needs CUDA)"
  capability = getattr(device, "compute_capability", None)
  if capability:
    major_minor = tuple(int(v) for v in str(capability).split(".")[:2])
    if major_minor < (8, 0):
      return f"the GPU has compute capability {capability} (cuDNN flash attention needs >= 8.0)"
  return None


def _cudnn_max_head_dim() -> int:
  """cuDNN flash attention takes head_dim up to 256 on Hopper (compute capability 9.0) and newer,
  128 before."""
  capability = getattr(jax.devices()[0], "compute_capability", None)
  try:
    return 256 if capability and float(capability) >= 9.0 else 128
  except ValueError:
    return 128


def cudnn_attention_problem(dtype, head_dim: int, length: int, has_bias: bool, *,
                            max_head_dim: int = 128) -> str | None:
  """Why cuDNN flash attention (`jax.nn.dot_product_attention(..., implementation="cudnn")`) does
  not take this case, or None when it does: the inputs must be bfloat16 (of the compute dtypes
  here), head_dim a multiple of 8 and at most `max_head_dim`, and with an additive bias the
  backward pass needs an even sequence length. The device is not looked at."""
  if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
    return f"the compute dtype is {jnp.dtype(dtype).name} (cuDNN flash attention needs bfloat16)"
  if head_dim % 8 or head_dim > max_head_dim:
    return (f"head_dim {head_dim} is not a multiple of 8 up to {max_head_dim} (what cuDNN flash "
            "attention takes)")
  if has_bias and length % 2:
    return (f"the sequence length {length} is odd and the scores have a bias (cuDNN's backward "
            "pass with a bias needs an even length)")
  return None


def resolve_attention_impl(impl: str, *, dtype, head_dim: int, length: int,
                           has_bias: bool) -> str:
  """The attention implementation that runs: "explicit", "xla" or "cudnn".

  "auto" is "cudnn" when the default backend is a CUDA GPU (compute capability 8.0 or newer), the
  compute dtype is bfloat16 and `cudnn_attention_problem` finds nothing, else "explicit" (so CPU
  and float32 runs compute exactly as before the option existed). "cudnn" requested where cuDNN
  cannot run raises a ValueError saying why, before anything is computed. The choice is made when
  the attention is traced, per call, from static shapes.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl {impl!r} is not one of {ATTENTION_IMPLS}")
  if impl in ("explicit", "xla"):
    return impl
  problem = _cudnn_device_problem()
  if problem is None:
    problem = cudnn_attention_problem(dtype, head_dim, length, has_bias,
                                      max_head_dim=_cudnn_max_head_dim())
  if impl == "auto":
    return "explicit" if problem else "cudnn"
  if problem:
    raise ValueError(f"attention_impl='cudnn' cannot run here: {problem}; use 'auto' (cuDNN where "
                     "it runs, else the explicit matmuls), 'xla' or 'explicit'")
  return "cudnn"


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection ([q|k|v], head-major channels).

  attention_impl (see `resolve_attention_impl`; the same function up to rounding):
  "explicit": (B, heads, L, head_dim) matmuls written out; the q·k product in the compute dtype,
    then the scores, the relative-position terms and `bias` (added one after the other) and the
    softmax in float32.
  "xla" / "cudnn": `jax.nn.dot_product_attention` on (B, L, heads, head_dim) q, k, v with
    `implementation=` that name, the relative-position terms and `bias` summed into one float32
    additive bias first (broadcast over batch and heads where they allow). Its XLA implementation
    computes the scores with float32 accumulation and output (also for bfloat16 q, k), adds the
    bias in float32, takes the softmax in float32 and casts the probabilities to the compute dtype
    before the product with v, as "explicit" does. "cudnn" is cuDNN flash attention, which never
    stores the (L, L) scores; the bias is handed to it in the compute dtype (bfloat16), and its
    gradient (to the tables and, for "decomposed", to q) comes back from cuDNN, which jax's wrapper
    does for every bias shape in the pinned release (older ones returned zeros for batched biases).
  "auto": "cudnn" on a CUDA GPU in bfloat16 where cuDNN takes the shapes, else "explicit".

  rel_pos: "none"; "table" (a BEiT-style per-block table `relative_position_bias_table`
  ((2gh−1)(2gw−1), heads)); or "decomposed" (ViTDet's `rel_pos_h` (2gh−1, hd), `rel_pos_w`
  (2gw−1, hd)). rel_pos_grid = (gh, gw), the token grid this attention sees (a window or the whole
  map). Tables start at zero, as in the official backbones. lean_softmax: use
  `softmax_keep_output` (same forward, half the saved attention activations) in the explicit
  computation.
  """

  def __init__(self, dim: int, num_heads: int, *, kernel_init: Initializer,
               rel_pos: str = "none", rel_pos_grid: tuple[int, int] | None = None,
               lean_softmax: bool = False, attention_impl: str = "auto", dtype=jnp.float32,
               rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
    if rel_pos not in ("none", "table", "decomposed"):
      raise ValueError(f"rel_pos {rel_pos!r} is not one of ('none', 'table', 'decomposed')")
    if attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl {attention_impl!r} is not one of {ATTENTION_IMPLS}")
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = Linear(dim, 3 * dim, kernel_init=kernel_init(dim, 3 * dim), dtype=dtype, rngs=rngs)
    self.proj = Linear(dim, dim, kernel_init=kernel_init(dim, dim), dtype=dtype, rngs=rngs)
    self.dtype = dtype
    self.lean_softmax = lean_softmax
    self.attention_impl = attention_impl
    self.rel_pos = rel_pos
    self.rel_pos_grid = None if rel_pos_grid is None else tuple(int(g) for g in rel_pos_grid)
    if rel_pos != "none":
      gh, gw = self.rel_pos_grid
      if rel_pos == "table":
        self.relative_position_bias_table = nnx.Param(
            jnp.zeros(((2 * gh - 1) * (2 * gw - 1), num_heads), jnp.float32))
      else:
        hd = dim // num_heads
        self.rel_pos_h = nnx.Param(jnp.zeros((2 * gh - 1, hd), jnp.float32))
        self.rel_pos_w = nnx.Param(jnp.zeros((2 * gw - 1, hd), jnp.float32))

  def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """x (B, L, D); bias broadcastable to (B, heads, L, L), added to the scaled scores."""
    b, length, d = x.shape
    h = self.num_heads
    impl = resolve_attention_impl(self.attention_impl, dtype=self.dtype, head_dim=d // h,
                                  length=length,
                                  has_bias=self.rel_pos != "none" or bias is not None)
    if impl != "explicit":
      return self._fused(x, bias, impl)
    q, k, v = (t.reshape(b, length, h, d // h).transpose(0, 2, 1, 3)
               for t in _split_qkv(self.qkv(x)))
    if _exact_power_of_two(self.scale):
      # Scaling q by 2^-n is exact, so the scores are bit-equal to scaling them, on 1/L of the data.
      scores = batched_matmul(q * jnp.asarray(self.scale, q.dtype), k.swapaxes(-1, -2)).astype(
          jnp.float32)
    else:
      scores = batched_matmul(q, k.swapaxes(-1, -2)).astype(jnp.float32) * self.scale
    if self.rel_pos == "table":
      scores = scores + table_bias(self.relative_position_bias_table[...], self.rel_pos_grid)
    elif self.rel_pos == "decomposed":
      scores = decomposed_bias(scores, q, self.rel_pos_h[...], self.rel_pos_w[...],
                               self.rel_pos_grid)
    if bias is not None:
      scores = scores + bias.astype(jnp.float32)
    softmax = softmax_keep_output if self.lean_softmax else partial(jax.nn.softmax, axis=-1)
    probs = softmax(scores).astype(self.dtype)
    out = batched_matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, length, d)
    return self.proj(out)

  def _fused(self, x: jax.Array, bias: jax.Array | None, impl: str) -> jax.Array:
    """`jax.nn.dot_product_attention(implementation=impl)` with every score term in one bias."""
    b, length, d = x.shape
    h = self.num_heads
    q, k, v = (t.reshape(b, length, h, d // h) for t in _split_qkv(self.qkv(x)))  # B, L, heads, hd
    total = None
    if self.rel_pos == "table":
      total = table_bias(self.relative_position_bias_table[...], self.rel_pos_grid)
    elif self.rel_pos == "decomposed":
      total = decomposed_bias(None, q.transpose(0, 2, 1, 3), self.rel_pos_h[...],
                              self.rel_pos_w[...], self.rel_pos_grid)
    if bias is not None:
      bias = bias.astype(jnp.float32)
      total = bias if total is None else total + bias
    if total is not None:
      total = total.reshape((1,) * (4 - total.ndim) + total.shape)
      # cuDNN wants the bias's last two axes whole; batch and heads may stay broadcast (size 1).
      total = jnp.broadcast_to(total, total.shape[:2] + (length, length))
      if impl == "cudnn":
        total = total.astype(self.dtype)
    out = jax.nn.dot_product_attention(q, k, v, bias=total, scale=self.scale,
                                       implementation=impl)
    return self.proj(out.reshape(b, length, d))


class Mlp(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, kernel_init: Initializer, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.fc1 = Linear(dim, hidden, kernel_init=kernel_init(dim, hidden), dtype=dtype, rngs=rngs)
    self.fc2 = Linear(hidden, dim, kernel_init=kernel_init(hidden, dim), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(gelu(self.fc1(x)))


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
  """(B, H, W, D) → (B·nh·nw, window², D), zero-padding H and W up to multiples of `window`
  (bottom and right, as ViTDet). Windows row-major, tokens row-major inside. Returns the padded
  (H, W) too."""
  b, h, w, d = x.shape
  ph, pw = (-h) % window, (-w) % window
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  hp, wp = h + ph, w + pw
  x = x.reshape(b, hp // window, window, wp // window, window, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window * window, d), (hp, wp)


def window_unpartition(x: jax.Array, window: int, padded: tuple[int, int],
                       grid: tuple[int, int]) -> jax.Array:
  """Inverse of `window_partition`, cropping the padding: → (B, H, W, D)."""
  hp, wp = padded
  d = x.shape[-1]
  x = x.reshape(-1, hp // window, wp // window, window, window, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, hp, wp, d)[:, :grid[0], :grid[1]]


class Block(nnx.Module):
  """Pre-norm transformer block (LayerNorm eps 1e-6) for stage 3 and the decoder.

  `kernel_init(fan_in, fan_out)` returns the Linear-weight initializer (xavier for pretraining,
  normal(0.02) for the classifier); biases start at zero.

  Backbone options (all off by default): window_size > 0 makes the attention local to
  non-overlapping window_size² windows of the token grid (padded with zero tokens after norm1 when
  the grid does not divide, as ViTDet; padded tokens are keys like any other); layer_scale = the
  initial value of per-channel gammas `gamma_1` / `gamma_2` on the two branches (BEiT);
  rel_pos / rel_pos_grid / lean_softmax / attention_impl go to `Attention`.
  """

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *,
               kernel_init: Callable[[int, int], Initializer], drop_path: float = 0.0,
               window_size: int = 0, layer_scale: float | None = None, rel_pos: str = "none",
               rel_pos_grid: tuple[int, int] | None = None, lean_softmax: bool = False,
               attention_impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
    self.norm1 = LayerNorm(dim, 1e-6, dtype=dtype)
    self.attn = Attention(dim, num_heads, kernel_init=kernel_init, rel_pos=rel_pos,
                          rel_pos_grid=rel_pos_grid, lean_softmax=lean_softmax,
                          attention_impl=attention_impl, dtype=dtype, rngs=rngs)
    self.norm2 = LayerNorm(dim, 1e-6, dtype=dtype)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), kernel_init=kernel_init, dtype=dtype, rngs=rngs)
    self.drop_path = DropPath(drop_path, rngs=rngs)
    self.window_size = int(window_size)
    self.layer_scale = layer_scale
    if layer_scale is not None:
      self.gamma_1 = nnx.Param(jnp.full((dim,), layer_scale, jnp.float32))
      self.gamma_2 = nnx.Param(jnp.full((dim,), layer_scale, jnp.float32))

  def __call__(self, x: jax.Array, *, grid: tuple[int, int] | None = None,
               bias: jax.Array | None = None) -> jax.Array:
    """x (B, L, D). grid (H, W) with H·W = L is needed by windowed blocks; bias (shared relative
    position bias) is added to the attention scores, per window in a windowed block."""
    x = grad_barrier(x)
    if self.window_size == 0 and self.layer_scale is None and bias is None:
      x = x + self.drop_path(self.attn(self.norm1(x)))
      return x + self.drop_path(self.mlp(self.norm2(x)))
    y = self.norm1(x)
    if self.window_size:
      b, length, d = y.shape
      win, padded = window_partition(y.reshape(b, grid[0], grid[1], d), self.window_size)
      y = window_unpartition(self.attn(win, bias), self.window_size, padded, grid)
      y = y.reshape(b, length, d)
    else:
      y = self.attn(y, bias)
    if self.layer_scale is not None:
      y = y * self.gamma_1[...].astype(y.dtype)
    x = x + self.drop_path(y)
    y = self.mlp(self.norm2(x))
    if self.layer_scale is not None:
      y = y * self.gamma_2[...].astype(y.dtype)
    return x + self.drop_path(y)
