"""UperNet on a ConvViT backbone (spec §5.2): mmsegmentation's ``EncoderDecoder`` with a ``UPerHead``
decode head and an ``FCNHead`` auxiliary head, in Flax NNX, NHWC.

    from flax import nnx
    from convmae_jax import models
    seg = models.create_segmentor("convvit_seg_base", num_classes=150, rngs=nnx.Rngs(0))
    logits = seg(images)                      # (N, S, S, 150), bilinear to the input size
    loss, scalars = seg.loss(images, labels)  # labels (N, S, S) int, 255 = ignore

What it computes (mmseg 0.11 ``uper_head.py`` / ``psp_head.py`` / ``fcn_head.py`` /
``decode_head.py`` / ``encoder_decoder.py``, re-written from their documented behaviour):

* ``ConvModule``: conv without bias -> BatchNorm (SyncBN in the official config: the JAX batch axis
  is the global batch, so the statistics are over every device's rows) -> ReLU.
* UPerHead over the four maps ``[stride4, stride8, stride16, stride32]``:
  - PPM on the last map: for each pool scale s in (1, 2, 3, 6), adaptive average pooling to s x s
    (PyTorch bins: ``floor(i·n/s) .. ceil((i+1)·n/s)``), a 1x1 ConvModule, bilinear resize back
    (``align_corners=False``); the map and the four branches are concatenated and fused by a 3x3
    ConvModule (``bottleneck``);
  - 1x1 lateral ConvModules on the other three maps; top-down path: from the coarsest, each level
    is resized bilinearly to the next finer one and added to it;
  - 3x3 ``fpn_convs`` on the three finer levels; every level resized to the stride-4 map,
    concatenated (finest first) and fused by the 3x3 ``fpn_bottleneck``;
  - ``cls_seg``: Dropout2d(0.1) (whole channels per sample) then a 1x1 conv with bias (``conv_seg``).
* FCNHead (auxiliary, on the stride-16 map): ``num_convs`` 3x3 ConvModules (1 official,
  ``concat_input=False``) then ``cls_seg``.
* Loss: each head's logits resized bilinearly to the label size, softmax cross entropy with the
  ignore index; mmseg 0.11 averages over all pixels (ignored ones count as 0, ``avg_non_ignore=False``,
  the official run) -- ``avg_non_ignore=True`` averages over the labelled pixels only. Total =
  decode + ``aux_weight`` (0.4) x auxiliary.

Attribute names mirror mmseg's state-dict keys (``decode_head.lateral_convs.0.conv.weight``, ...)
so that ``interop.segmentor`` is a renaming; the one difference is PPM's ``psp_modules.{i}.1``
(a Sequential of the pool and the ConvModule in mmseg), which is ``psp_modules.{i}`` here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convmae_jax.models import layers
from convmae_jax.models.backbone import BatchNorm, ConvViTBackbone
from convmae_jax.models.config import BackboneConfig

FEATURE_KEYS = ("stride4", "stride8", "stride16", "stride32")
IGNORE_INDEX = 255
_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------------
# Resampling as matrices (exact PyTorch semantics, no antialiasing, any sizes).
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 weights of 1-D bilinear resampling as PyTorch's
  ``F.interpolate(mode="bilinear", align_corners=False)`` with an output size: the source
  coordinate of output i is ``(i + 0.5)·in/out − 0.5``, clamped below at 0; the upper neighbour is
  clamped at ``in − 1``."""
  # The coordinates are computed in float32 as PyTorch's CPU kernel does, so the weights agree
  # with it to the last bit or so rather than to float32's resolution at the coordinate (1e-6 of
  # a 30-pixel coordinate is a visible 4e-6 in the output).
  f32 = np.float32
  m = np.zeros((out_size, in_size), np.float32)
  scale = f32(in_size) / f32(out_size)
  for i in range(out_size):
    src = max(scale * (f32(i) + f32(0.5)) - f32(0.5), f32(0.0))
    lo = min(int(math.floor(src)), in_size - 1)
    hi = min(lo + 1, in_size - 1)
    frac = f32(src - f32(lo))
    m[i, lo] += f32(1.0) - frac
    m[i, hi] += frac
  return m


@functools.lru_cache(maxsize=None)
def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 weights of PyTorch's ``AdaptiveAvgPool`` along one axis: output i
  averages inputs ``floor(i·in/out) .. ceil((i+1)·in/out) − 1``."""
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """NHWC ``x`` resized to ``size`` = (H', W') as PyTorch's bilinear, ``align_corners=False``
  (:func:`bilinear_matrix` along each axis; float32 accumulation); same dtype out."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x
  mh = jnp.asarray(bilinear_matrix(h, size[0]))
  mw = jnp.asarray(bilinear_matrix(w, size[1]))
  y = jnp.einsum("ih,nhwc->niwc", mh, x.astype(jnp.float32), precision=_HIGHEST)
  y = jnp.einsum("jw,niwc->nijc", mw, y, precision=_HIGHEST)
  return y.astype(x.dtype)


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
  """NHWC ``x`` average-pooled to ``size`` x ``size`` with PyTorch's adaptive bins."""
  h, w = x.shape[1:3]
  mh = jnp.asarray(adaptive_pool_matrix(h, size))
  mw = jnp.asarray(adaptive_pool_matrix(w, size))
  y = jnp.einsum("ih,nhwc->niwc", mh, x.astype(jnp.float32), precision=_HIGHEST)
  y = jnp.einsum("jw,niwc->nijc", mw, y, precision=_HIGHEST)
  return y.astype(x.dtype)


# --------------------------------------------------------------------------------------------------
# Layers.
# --------------------------------------------------------------------------------------------------
def kaiming_normal_fan_out(fan_out: int) -> layers.Initializer:
  """mmcv ``kaiming_init`` (mode fan_out, ReLU gain): N(0, 2 / fan_out), fan_out = out·k·k."""
  return layers.normal(math.sqrt(2.0 / fan_out))


CONV_IMPLS = ("auto", "lax", "matmul")


def resolve_conv_impl(impl: str) -> str:
  """'auto' picks 'matmul' on CPU and 'lax' (cuDNN / the TPU's convolutions) elsewhere."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl={impl!r} is not accepted; use one of {CONV_IMPLS}")
  if impl == "auto":
    return "matmul" if jax.default_backend() == "cpu" else "lax"
  return impl


def _im2col(x: jax.Array, k: int) -> jax.Array:
  """(N, H, W, C) → (N, H, W, k, k, C): the k x k zero-padded neighbourhood of every position."""
  p = k // 2
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  return jnp.stack([jnp.stack([xp[:, i:i + h, j:j + w] for j in range(k)], axis=3)
                    for i in range(k)], axis=3)


def _same_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A "same" k x k conv as matmuls, through whichever side is narrower: widening (C <= O), the
  k² neighbourhoods of x against the kernel (one matmul of k²·C columns); narrowing (C > O), x
  against all k² taps first (k²·O columns), then the k² shifted views of those products summed.
  Either way the transient is k² maps of min(C, O) channels, and one large matmul does the work."""
  k = kernel.shape[0]
  _, h, w, c = x.shape
  o = kernel.shape[-1]
  if c <= o:
    return jnp.einsum("nhwijc,ijco->nhwo", _im2col(x, k), kernel)
  p = k // 2
  taps = jnp.einsum("nhwc,ijco->nhwijo", x, kernel)
  taps = jnp.pad(taps, ((0, 0), (p, p), (p, p), (0, 0), (0, 0), (0, 0)))
  out = None
  for i in range(k):
    for j in range(k):
      term = taps[:, i:i + h, j:j + w, i, j]
      out = term if out is None else out + term
  return out


@jax.custom_vjp
def _conv_as_matmuls(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _same_conv(x, kernel)


def _conv_fwd(x, kernel):
  return _same_conv(x, kernel), (x, kernel)


def _conv_bwd(res, g):
  x, kernel = res
  k = kernel.shape[0]
  # The input gradient is the "same" conv of g with the kernel flipped and in/out swapped. Tap
  # (i, j)'s kernel gradient is the input's (i, j) neighbour against g, or equally the input
  # against g's (k-1-i, k-1-j) neighbour: the neighbourhoods are taken of the narrower of the two.
  dx = _same_conv(g, jnp.swapaxes(kernel[::-1, ::-1], 2, 3))
  if x.shape[-1] <= g.shape[-1]:
    dk = jnp.einsum("nhwijc,nhwo->ijco", _im2col(x, k), g)
  else:
    dk = jnp.einsum("nhwc,nhwijo->ijco", x, _im2col(g, k)[:, :, :, ::-1, ::-1])
  return dx, dk.astype(kernel.dtype)


_conv_as_matmuls.defvjp(_conv_fwd, _conv_bwd)


def conv_as_matmuls(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A stride-1 k x k "same" conv (NHWC, HWIO) as matmuls of shifted views (`_same_conv`): the same
  products as the convolution in another order, which XLA:CPU runs faster than its convolution
  (benchmarks/head_conv.py, BENCHMARKS.md).

  The backward pass is written out (a custom VJP) so that it keeps only the input: autodiff of k²
  shifted matmuls kept the k² shifted views of it for the kernel gradient, k² times the input's
  memory per conv (a Base UperNet step at 512 px, batch 2, no longer fitted in 24 GB)."""
  k = kernel.shape[0]
  if k == 1:
    return jnp.einsum("nhwc,co->nhwo", x, kernel[0, 0])
  return _conv_as_matmuls(x, kernel)


class Conv2d(nnx.Module):
  """k x k conv, stride 1, padding k // 2 (mmseg's "same" convs), kernel HWIO, optional bias.
  ``impl``: "lax" (a convolution), "matmul" (:func:`conv_as_matmuls`) or "auto" (by backend)."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, bias: bool,
               kernel_init: layers.Initializer, impl: str = "auto", dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.kernel = nnx.Param(kernel_init(rngs.params(),
                                        (kernel_size, kernel_size, in_channels, out_channels)))
    self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32)) if bias else nnx.data(None)
    self.kernel_size = kernel_size
    self.impl = impl
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.kernel_size // 2
    x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
    if resolve_conv_impl(self.impl) == "matmul":
      y = conv_as_matmuls(x, kernel)
    else:
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(p, p), (p, p)],
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class ConvModule(nnx.Module):
  """mmcv ConvModule as the heads use it: conv (no bias) -> BatchNorm -> ReLU. (N, H, W, C_in) ->
  (N, H, W, C_out) in the compute dtype."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
               conv_impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv = Conv2d(in_channels, out_channels, kernel_size, bias=False, dtype=dtype,
                       kernel_init=kaiming_normal_fan_out(out_channels * kernel_size ** 2),
                       impl=conv_impl, rngs=rngs)
    self.bn = BatchNorm(out_channels)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


class Dropout2d(layers.DropPath):
  """PyTorch ``nn.Dropout2d``: zeroes whole channels of each sample with probability ``rate`` and
  scales the rest by 1 / (1 − rate). Active unless ``deterministic`` (``model.eval()``); randomness
  from the ``dropout`` stream. ``DropPath``'s state; a mask per (sample, channel), and torch's
  order of operations (``x * (mask / keep)``)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.rate == 0.0 or self.deterministic:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0], 1, 1, x.shape[-1])
    u = jax.random.uniform(self.rngs(), shape, jnp.float32)
    return x * (jnp.floor(keep + u) / keep).astype(x.dtype)


def _conv_seg(channels: int, num_classes: int, conv_impl: str, dtype, rngs) -> Conv2d:
  # mmseg's BaseDecodeHead.init_weights: normal_init(conv_seg, mean=0, std=0.01), bias 0.
  return Conv2d(channels, num_classes, 1, bias=True, kernel_init=layers.normal(0.01),
                impl=conv_impl, dtype=dtype, rngs=rngs)


# --------------------------------------------------------------------------------------------------
# Heads.
# --------------------------------------------------------------------------------------------------
class UPerHead(nnx.Module):
  """mmseg ``UPerHead`` (module docstring). ``inputs``: the list of NHWC maps, finest first, with
  ``in_channels`` channels; returns (N, H0, W0, num_classes) logits at the first map's size."""

  def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int, *,
               pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
               conv_impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
    in_channels = tuple(int(c) for c in in_channels)
    conv = functools.partial(ConvModule, conv_impl=conv_impl, dtype=dtype, rngs=rngs)
    self.pool_scales = tuple(int(s) for s in pool_scales)
    self.psp_modules = nnx.List([conv(in_channels[-1], channels, 1) for _ in self.pool_scales])
    self.bottleneck = conv(in_channels[-1] + len(self.pool_scales) * channels, channels, 3)
    self.lateral_convs = nnx.List([conv(c, channels, 1) for c in in_channels[:-1]])
    self.fpn_convs = nnx.List([conv(channels, channels, 3) for _ in in_channels[:-1]])
    self.fpn_bottleneck = conv(len(in_channels) * channels, channels, 3)
    self.dropout = Dropout2d(dropout, rngs=rngs)
    self.conv_seg = _conv_seg(channels, num_classes, conv_impl, dtype, rngs)

  def psp_forward(self, x: jax.Array) -> jax.Array:
    """PPM on the coarsest map and the bottleneck: (N, h, w, C_last) -> (N, h, w, channels)."""
    size = x.shape[1:3]
    outs = [x]
    for scale, module in zip(self.pool_scales, self.psp_modules):
      outs.append(resize_bilinear(module(adaptive_avg_pool(x, scale)), size))
    return self.bottleneck(jnp.concatenate(outs, axis=-1))

  def features(self, inputs: Sequence[jax.Array]) -> jax.Array:
    """The fused stride-4 features before ``cls_seg``: (N, H0, W0, channels)."""
    laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
    laterals.append(self.psp_forward(inputs[-1]))
    for i in range(len(laterals) - 1, 0, -1):     # top-down: coarse into fine
      laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
    outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
    size = outs[0].shape[1:3]
    outs = [outs[0]] + [resize_bilinear(o, size) for o in outs[1:]]
    return self.fpn_bottleneck(jnp.concatenate(outs, axis=-1))

  def __call__(self, inputs: Sequence[jax.Array]) -> jax.Array:
    return self.conv_seg(self.dropout(self.features(inputs)))


class FCNHead(nnx.Module):
  """mmseg ``FCNHead`` with ``concat_input=False``: ``num_convs`` 3x3 ConvModules then ``cls_seg``.
  (N, h, w, in_channels) -> (N, h, w, num_classes)."""

  def __init__(self, in_channels: int, channels: int, num_classes: int, *, num_convs: int = 1,
               dropout: float = 0.1, conv_impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
    self.convs = nnx.List([ConvModule(in_channels if i == 0 else channels, channels, 3,
                                      conv_impl=conv_impl, dtype=dtype, rngs=rngs)
                           for i in range(num_convs)])
    self.dropout = Dropout2d(dropout, rngs=rngs)
    self.conv_seg = _conv_seg(channels if num_convs else in_channels, num_classes, conv_impl, dtype,
                              rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for conv in self.convs:
      x = conv(x)
    return self.conv_seg(self.dropout(x))


# --------------------------------------------------------------------------------------------------
# Loss.
# --------------------------------------------------------------------------------------------------
def segmentation_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                               ignore_index: int = IGNORE_INDEX,
                               avg_non_ignore: bool = False) -> jax.Array:
  """Mean softmax cross entropy of (N, H, W, K) logits against (N, H, W) integer labels, float32.

  Pixels labelled ``ignore_index`` contribute 0. ``avg_non_ignore=False`` (mmseg 0.11, the official
  run) divides by every pixel; ``True`` by the labelled pixels only (0 when there are none)."""
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  nll = jnp.where(valid, nll, 0.0)
  if avg_non_ignore:
    return jnp.sum(nll) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  return jnp.mean(nll)


def pixel_accuracy(logits: jax.Array, labels: jax.Array, *,
                   ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """Percent of labelled pixels whose argmax is right (mmseg's ``acc_seg``); float32 scalar."""
  valid = labels != ignore_index
  right = (jnp.argmax(logits, axis=-1) == labels) & valid
  return 100.0 * jnp.sum(right) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# The segmentor.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """The heads of :class:`Segmentor` (official ADE20K values as defaults, spec §5.2).

  num_classes: output classes (150 for ADE20K with reduce_zero_label).
  channels: UPerHead width (768 in the official ConvMAE config).
  pool_scales: PPM output sides.
  aux_channels / aux_num_convs: FCNHead width and depth (256, 1 in mmseg's upernet base config);
    aux_channels 0 = no auxiliary head.
  aux_in_index: which backbone map the auxiliary head reads (2 = stride 16).
  aux_weight: its loss weight (0.4).
  dropout: Dropout2d rate before both classifiers (0.1).
  avg_non_ignore: cross entropy averaged over labelled pixels only (mmseg 0.11: False).
  conv_impl: the heads' convs as convolutions ("lax") or as matmuls of shifted views ("matmul",
    faster on XLA:CPU); "auto": matmul on CPU, lax elsewhere. The same numbers up to float order.
  """
  num_classes: int = 150
  channels: int = 768
  pool_scales: tuple[int, ...] = (1, 2, 3, 6)
  aux_channels: int = 256
  aux_num_convs: int = 1
  aux_in_index: int = 2
  aux_weight: float = 0.4
  dropout: float = 0.1
  avg_non_ignore: bool = False
  conv_impl: str = "auto"

  def validate(self) -> None:
    if not isinstance(self.num_classes, int) or self.num_classes < 1:
      raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}")
    if self.num_classes > IGNORE_INDEX:
      raise ValueError(f"num_classes={self.num_classes} collides with the ignore index "
                       f"{IGNORE_INDEX}; accepted: 1..{IGNORE_INDEX}")
    if self.channels < 1 or self.aux_channels < 0 or self.aux_num_convs < 0:
      raise ValueError(f"channels={self.channels}, aux_channels={self.aux_channels}, aux_num_convs="
                       f"{self.aux_num_convs}: expected channels >= 1 and the others >= 0")
    if not self.pool_scales or any(int(s) < 1 for s in self.pool_scales):
      raise ValueError(f"pool_scales={self.pool_scales!r}: expected positive sides, e.g. (1, 2, 3, 6)")
    if not 0 <= self.aux_in_index < len(FEATURE_KEYS):
      raise ValueError(f"aux_in_index={self.aux_in_index}: expected 0..{len(FEATURE_KEYS) - 1}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout={self.dropout} must lie in [0, 1)")
    if self.conv_impl not in CONV_IMPLS:
      raise ValueError(f"conv_impl={self.conv_impl!r} is not accepted; use one of {CONV_IMPLS}")

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def check_backbone_fits(config: BackboneConfig) -> None:
  """ValueError unless the backbone gives the four maps UperNet reads (strides 4, 8, 16, 32)."""
  if config.out_stride32 == "none":
    raise ValueError("UperNet reads four maps (strides 4, 8, 16, 32), but this backbone has "
                     "out_stride32='none' (three outputs); use a convvit_seg_* or convvit_det_* "
                     "backbone, or set out_stride32 to 'conv_bn_gelu' or 'maxpool'")
  if tuple(config.patch_sizes)[:2] != (4, 2) or config.total_stride != 16:
    raise ValueError(f"patch_sizes {tuple(config.patch_sizes)} give strides "
                     f"{config.patch_sizes[0]}, {config.patch_sizes[0] * config.patch_sizes[1]}, "
                     f"{config.total_stride}; UperNet's levels are strides 4, 8, 16 (patch_sizes "
                     f"(4, 2, 2))")


class Segmentor(nnx.Module):
  """``backbone`` (a ConvViTBackbone) + ``decode_head`` (UPerHead) + ``auxiliary_head`` (FCNHead).

  images (N, S, S, C) NHWC normalized, S = the backbone's img_size. Dropout, drop path and
  BatchNorm batch statistics are active until ``model.eval()``."""

  def __init__(self, backbone_config: BackboneConfig, head_config: HeadConfig, *,
               rngs: nnx.Rngs):
    head_config.validate()
    check_backbone_fits(backbone_config)
    self.head_config = head_config
    self.backbone = ConvViTBackbone(backbone_config, rngs=rngs)
    c1, c2, d = backbone_config.embed_dims
    in_channels = (c1, c2, d, d)
    dt = backbone_config.jnp_dtype
    self.decode_head = UPerHead(in_channels, head_config.channels, head_config.num_classes,
                                pool_scales=head_config.pool_scales, dropout=head_config.dropout,
                                conv_impl=head_config.conv_impl, dtype=dt, rngs=rngs)
    if head_config.aux_channels > 0:
      self.auxiliary_head = FCNHead(in_channels[head_config.aux_in_index], head_config.aux_channels,
                                    head_config.num_classes, num_convs=head_config.aux_num_convs,
                                    dropout=head_config.dropout, conv_impl=head_config.conv_impl,
                                    dtype=dt, rngs=rngs)

  @property
  def config(self) -> BackboneConfig:
    return self.backbone.config

  @property
  def has_aux(self) -> bool:
    return hasattr(self, "auxiliary_head")

  def head_logits(self, images: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """(decode logits (N, S/4, S/4, K), auxiliary logits (N, S/16, S/16, K) or None) at the heads'
    own resolutions, in the compute dtype."""
    maps = self.backbone.features(images)
    feats = [maps[k] for k in FEATURE_KEYS]
    decode = self.decode_head(feats)
    aux = self.auxiliary_head(feats[self.head_config.aux_in_index]) if self.has_aux else None
    return decode, aux

  def __call__(self, images: jax.Array) -> jax.Array:
    """Decode-head logits resized bilinearly to the input size: (N, S, S, K) float32 (mmseg's
    ``encode_decode``; the auxiliary head is not run)."""
    maps = self.backbone.features(images)
    logits = self.decode_head([maps[k] for k in FEATURE_KEYS])
    return resize_bilinear(logits.astype(jnp.float32), images.shape[1:3])

  def loss(self, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(decode CE + aux_weight · auxiliary CE, {"decode_loss", "aux_loss", "pixel_acc"}).

    labels (N, H, W) integers in [0, K) or ``IGNORE_INDEX``; each head's logits are resized to
    (H, W) first, as mmseg does."""
    cfg = self.head_config
    decode, aux = self.head_logits(images)
    size = labels.shape[1:3]
    decode = resize_bilinear(decode.astype(jnp.float32), size)
    decode_loss = segmentation_cross_entropy(decode, labels, avg_non_ignore=cfg.avg_non_ignore)
    scalars = {"decode_loss": decode_loss, "pixel_acc": pixel_accuracy(decode, labels)}
    total = decode_loss
    if aux is not None:
      aux = resize_bilinear(aux.astype(jnp.float32), size)
      aux_loss = segmentation_cross_entropy(aux, labels, avg_non_ignore=cfg.avg_non_ignore)
      scalars["aux_loss"] = aux_loss
      total = total + cfg.aux_weight * aux_loss
    return total, scalars


def create_segmentor(backbone: str, *, rngs: nnx.Rngs, head: dict | None = None,
                     **backbone_overrides) -> Segmentor:
  """A :class:`Segmentor` on the registered backbone ``backbone`` (``convvit_seg_base``, ...) with
  backbone config overrides (img_size, drop_path_rate, dtype, ...) and :class:`HeadConfig` fields
  in ``head``."""
  from convmae_jax import models  # pylint: disable=import-outside-toplevel
  bcfg = models.config_for(backbone, **backbone_overrides)
  if not isinstance(bcfg, BackboneConfig):
    raise ValueError(f"{backbone!r} is not a backbone; accepted: convvit_seg_*, convvit_det_*")
  return Segmentor(bcfg, head_config_from(head or {}), rngs=rngs)


def head_config_from(fields: dict) -> HeadConfig:
  """A validated :class:`HeadConfig` from a dict of its fields (unknown names refused)."""
  known = {f.name for f in dataclasses.fields(HeadConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise TypeError(f"unknown HeadConfig field(s) {unknown}; accepted: {sorted(known)}")
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  cfg = HeadConfig(**fields)
  cfg.validate()
  return cfg
