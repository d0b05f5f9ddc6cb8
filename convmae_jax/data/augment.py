"""timm 0.3.2 RandAugment and RandomErasing in TensorFlow: per example, stateless, graph-safe.

ConvMAE fine-tunes with timm 0.3.2's ``create_transform(224, is_training=True,
auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic', re_prob=0.25, re_mode='pixel',
re_count=1, mean/std=ImageNet)``. Its training transform is, in this order:

  RandomResizedCrop (bicubic) -> horizontal flip (p=1/2) -> `rand_augment` (uint8 (H, W, 3)) ->
  ToTensor + ImageNet mean/std normalisation -> `random_erasing` (float32 (H, W, 3), normalized).

Every random number is drawn by TF stateless ops from one shape-[2] int64 seed per call (split with
``tf.random.experimental.stateless_split``), so a result depends only on (image, seed, arguments):
a pipeline built on these functions stays deterministic and resumable. All functions run eagerly
and inside ``tf.data.Dataset.map`` (graph mode).

RandAugment (timm ``RandAugment`` + ``AugmentOp``): ``num_ops`` ops drawn uniformly with
replacement from the 15-op set; each is skipped with probability ``1 - prob`` (timm: ``random() >
prob``); otherwise its magnitude is ``N(magnitude, magnitude_std)`` clipped to [0, 10], mapped to
the op argument by timm's level rule (with a random sign for Rotate, Shear*, Translate*Rel and the
*Increasing enhance ops) and the op is applied as timm calls PIL.

Fidelity to PIL (Pillow 12 source; tests/test_augment.py compares every op with PIL itself):

* AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd: the same integer LUTs as
  ImageOps (Equalize's LUT entries above 255 are clipped as ``Image.point`` does): exact.
* Color, Contrast, Brightness, Sharpness (ImageEnhance): Pillow's integer grey conversion
  ``L = (19595 R + 38470 G + 7471 B + 2**15) >> 16``, ImageStat's float64 mean of L rounded by
  ``int(mean + 0.5)``, the SMOOTH 3x3 filter (kernel [[1,1,1],[1,5,1],[1,1,1]]/13 in float32,
  ``+ 0.5`` then truncation, one-pixel border copied) and ``Image.blend`` (float32
  ``degenerate + float32(factor) * (image - degenerate)``, clipped to [0, 255] and truncated),
  all with Pillow's float32 operation order: exact in the tests.
* Rotate, ShearX/Y, TranslateX/YRel: Pillow's generic affine transform with BICUBIC. The output
  pixel centre (x + 0.5, y + 0.5) maps to the source point (a x + b y + c, d x + e y + f) in
  float64; a source point outside [0, W) x [0, H) gives the fill colour (timm: ImageNet mean
  (124, 116, 104)); otherwise the 4x4 neighbourhood around (x - 0.5, y - 0.5) (indices clamped to
  the image edge) is interpolated with Pillow's transform cubic, which is the a = -1 cubic
  convolution kernel (not the a = -0.5 of Pillow's resize), clipped to [0, 255] and truncated.
  Rotate's matrix is Image.rotate's: ``round(cos/sin(-radians(deg % 360)), 15)``, centre
  (W/2, H/2). Only difference: TF computes that cos/sin and the rounding to 15 decimals
  (``round(x * 1e15) / 1e15``) where Python uses libm and a correctly rounded decimal round, so a
  matrix entry may differ in its last bit, which can move a rare pixel that sits on a truncation
  boundary by one level (the tests measured none).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Sequence

import numpy as np

MAX_LEVEL = 10.0  # timm's _MAX_LEVEL: magnitudes are clipped to [0, MAX_LEVEL]
FILL = (124, 116, 104)  # timm img_mean: round(255 * ImageNet mean), the geometric ops' fill colour
DEFAULT_TRANSLATE_PCT = 0.45

RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")

_ERASE_TRIES = 10
_DEG_TO_RAD = math.pi / 180.0  # CPython's math.radians multiplies by this constant
_SPEC_HELP = ("expected 'rand' followed by '-'-separated sections m<magnitude, float >= 0>, "
              "n<number of ops, int >= 0>, mstd<magnitude std, float >= 0>, inc<0|1>, e.g. "
              "'rand-m9-mstd0.5-inc1'")


def _tf():
  """TensorFlow, imported on first use by the data pipeline's importer (keeps TF off the GPUs)."""
  from convmae_jax.data import pipeline  # here, not at the top: pipeline may import this module

  return pipeline._tf()


# ------------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class RandAugmentConfig:
  """timm RandAugment settings. Defaults: ConvMAE's 'rand-m9-mstd0.5-inc1'.

  num_ops: ops applied per image (timm num_layers). magnitude: mean level in [0, 10] units.
  magnitude_std: std of the per-op Gaussian magnitude noise (0: fixed magnitude).
  increasing: use the *Increasing op variants (timm 'inc1'). prob: probability that each drawn op
  is applied (timm fixes it at 0.5).
  """
  num_ops: int = 2
  magnitude: float = 9.0
  magnitude_std: float = 0.5
  increasing: bool = True
  prob: float = 0.5

  def __post_init__(self):
    if (isinstance(self.num_ops, bool) or not isinstance(self.num_ops, (int, np.integer))
        or self.num_ops < 0):
      raise ValueError(f"num_ops={self.num_ops!r} is not valid: expected an integer >= 0")
    for name, value in (("magnitude", self.magnitude), ("magnitude_std", self.magnitude_std)):
      if (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
          or not math.isfinite(value) or value < 0):
        raise ValueError(f"{name}={value!r} is not valid: expected a finite number >= 0")
    if not isinstance(self.prob, (int, float, np.number)) or not 0.0 <= self.prob <= 1.0:
      raise ValueError(f"prob={self.prob!r} is not valid: expected a number in [0, 1]")

  @property
  def op_names(self) -> tuple[str, ...]:
    """The 15 op names drawn from (timm _RAND_INCREASING_TRANSFORMS or _RAND_TRANSFORMS)."""
    return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


def parse_rand_augment(spec: str) -> RandAugmentConfig:
  """Parses a timm RandAugment string such as 'rand-m9-mstd0.5-inc1'.

  Sections after 'rand' (any order, each at most once): ``m`` magnitude (float, timm: int), ``n``
  number of ops, ``mstd`` magnitude std, ``inc`` 0/1. Missing sections take timm's defaults
  (m=10, n=2, mstd=0, inc=0), not RandAugmentConfig's. Unlike timm (where ``bool('0')`` is True),
  'inc0' means the non-increasing ops. timm's 'w' (weighted op choice) is not supported.
  Raises ValueError naming the bad part and what is accepted.
  """
  if not isinstance(spec, str):
    raise ValueError(f"RandAugment spec {spec!r} is not valid: {_SPEC_HELP}")
  parts = spec.strip().split("-")
  if parts[0] != "rand":
    raise ValueError(f"RandAugment spec {spec!r} is not valid: it starts with {parts[0]!r}; "
                     f"{_SPEC_HELP}")
  values: dict[str, Any] = {}
  for part in parts[1:]:
    m = re.fullmatch(r"([a-z]+)(\d.*)", part)
    key, val = m.groups() if m else (None, None)
    try:
      if key == "m":
        value = float(val)
        ok = math.isfinite(value) and value >= 0
      elif key == "n":
        value = int(val)
        ok = value >= 0
      elif key == "mstd":
        value = float(val)
        ok = math.isfinite(value) and value >= 0
      elif key == "inc":
        value = {"0": False, "1": True}.get(val)
        ok = value is not None
      else:
        ok = False
    except ValueError:
      ok = False
    if not ok or key in values:
      what = ("repeated" if ok else "not supported (timm's weighted op choice)" if key == "w"
              else "not understood")
      raise ValueError(f"RandAugment spec {spec!r} is not valid: section {part!r} is {what}; "
                       f"{_SPEC_HELP}")
    values[key] = value
  return RandAugmentConfig(num_ops=values.get("n", 2), magnitude=values.get("m", MAX_LEVEL),
                           magnitude_std=values.get("mstd", 0.0),
                           increasing=values.get("inc", False))


# ------------------------------------------------------------------------ pointwise/histogram


def _u8(x):
  tf = _tf()
  return tf.cast(x, tf.uint8)


def _floor_u8(v):
  """float in any range -> uint8 as Pillow stores a float result: clip to [0, 255], truncate."""
  tf = _tf()
  return tf.cast(tf.floor(tf.clip_by_value(v, 0.0, 255.0)), tf.uint8)


def auto_contrast(image, _arg=None, *, fill=FILL):
  """ImageOps.autocontrast(image) (cutoff 0): per channel x -> int(x * s - lo * s), s = 255/(hi-lo).

  A channel with hi == lo is unchanged. image: uint8 (H, W, 3) -> uint8 (H, W, 3).
  """
  tf = _tf()
  x = tf.cast(image, tf.int32)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  scale = 255.0 / tf.cast(tf.maximum(hi - lo, 1), tf.float64)
  offset = -tf.cast(lo, tf.float64) * scale
  # float64 like Python's floats; the int cast truncates toward zero like int().
  y = tf.clip_by_value(tf.cast(tf.cast(x, tf.float64) * scale + offset, tf.int32), 0, 255)
  return _u8(tf.where(hi > lo, y, x))


def equalize(image, _arg=None, *, fill=FILL):
  """ImageOps.equalize(image): per-channel histogram equalisation with PIL's LUT.

  step = (count - count of the last non-empty bin) // 255; step 0: channel unchanged; else
  lut[i] = (step // 2 + number of pixels below i) // step, clipped to 255. uint8 (H, W, 3).
  """
  tf = _tf()
  x = tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32)  # one 256-bin range/channel
  hist = tf.reshape(tf.math.bincount(tf.reshape(x, [-1]), minlength=768, maxlength=768,
                                     dtype=tf.int64), [3, 256])
  last = 255 - tf.argmax(tf.reverse(tf.cast(hist > 0, tf.int32), axis=[1]), axis=1,
                         output_type=tf.int32)
  step = (tf.reduce_sum(hist, axis=1) - tf.gather(hist, last, batch_dims=1)) // 255
  below = tf.cumsum(hist, axis=1, exclusive=True)  # pixels with a smaller value
  lut = (step[:, None] // 2 + below) // tf.maximum(step, 1)[:, None]
  lut = tf.where(step[:, None] > 0, lut, tf.range(256, dtype=tf.int64)[None, :])
  lut = tf.clip_by_value(lut, 0, 255)  # Image.point clips LUT entries to 8 bits
  return _u8(tf.gather(tf.reshape(lut, [-1]), x))


def invert(image, _arg=None, *, fill=FILL):
  """ImageOps.invert: 255 - x. uint8 (H, W, 3)."""
  tf = _tf()
  return _u8(255 - tf.cast(image, tf.int32))


def posterize(image, bits, *, fill=FILL):
  """timm posterize: bits >= 8 unchanged, else keep the `bits` most significant bits (0: black)."""
  tf = _tf()
  x = tf.cast(image, tf.int32)
  bits = tf.cast(bits, tf.int32)
  mask = tf.bitwise.bitwise_and(
      tf.bitwise.left_shift(tf.constant(255, tf.int32), tf.clip_by_value(8 - bits, 0, 8)), 255)
  return _u8(tf.where(bits >= 8, x, tf.bitwise.bitwise_and(x, mask)))


def solarize(image, threshold, *, fill=FILL):
  """ImageOps.solarize: pixels >= threshold become 255 - x (threshold 256: unchanged)."""
  tf = _tf()
  x = tf.cast(image, tf.int32)
  return _u8(tf.where(x < tf.cast(threshold, tf.int32), x, 255 - x))


def solarize_add(image, add, *, fill=FILL):
  """timm solarize_add (thresh 128): pixels < 128 become min(255, x + add)."""
  tf = _tf()
  x = tf.cast(image, tf.int32)
  return _u8(tf.where(x < 128, tf.minimum(255, x + tf.cast(add, tf.int32)), x))


# ------------------------------------------------------------------------------------- enhance


def _grey(image):
  """Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 2**15) >> 16, int32 (H, W)."""
  tf = _tf()
  x = tf.cast(image, tf.int32)
  return tf.bitwise.right_shift(
      x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000, 16)


def _blend(degenerate, image, factor):
  """Image.blend(degenerate, image, factor): float32 deg + alpha * (img - deg), clip, truncate.

  Pillow passes the factor to C as a float32 and computes in float32; same here (bit for bit).
  degenerate broadcasts against image (uint8/int (H, W, 3) or a scalar).
  """
  tf = _tf()
  alpha = tf.cast(factor, tf.float32)
  d = tf.cast(degenerate, tf.int32)
  diff = tf.cast(tf.cast(image, tf.int32) - d, tf.float32)
  return _floor_u8(tf.cast(d, tf.float32) + alpha * diff)


def color(image, factor, *, fill=FILL):
  """ImageEnhance.Color(image).enhance(factor): blend with the image's grey (L) version."""
  tf = _tf()
  grey = _grey(image)
  return _blend(tf.stack([grey, grey, grey], axis=-1), image, factor)


def contrast(image, factor, *, fill=FILL):
  """ImageEnhance.Contrast: blend with a uniform grey int(mean(L) + 0.5) (float64 mean)."""
  tf = _tf()
  grey = _grey(image)
  mean = (tf.cast(tf.reduce_sum(tf.cast(grey, tf.int64)), tf.float64)
          / tf.cast(tf.size(grey), tf.float64))
  return _blend(tf.cast(tf.floor(mean + 0.5), tf.int32), image, factor)


def brightness(image, factor, *, fill=FILL):
  """ImageEnhance.Brightness: blend with black."""
  return _blend(0, image, factor)


def _smooth(image):
  """image.filter(ImageFilter.SMOOTH): 3x3 [[1,1,1],[1,5,1],[1,1,1]]/13, border pixels copied.

  float32 with Pillow's operation order (kernel entries float32(k)/float32(13); per output pixel
  0.5 + row below + own row + row above, each row summed left to right), then truncation.
  """
  tf = _tf()
  side = np.float32(1.0) / np.float32(13.0)
  centre = np.float32(5.0) / np.float32(13.0)
  x = tf.cast(image, tf.float32)

  def row(r, mid):  # r: (H-2, W, 3) -> (H-2, W-2, 3)
    return (r[:, :-2] * side + r[:, 1:-1] * mid) + r[:, 2:] * side

  def filtered():
    ss = 0.5 + row(x[2:], side)
    ss = ss + row(x[1:-1], centre)
    ss = ss + row(x[:-2], side)
    inner = tf.pad(_floor_u8(ss), [[1, 1], [1, 1], [0, 0]])
    interior = tf.pad(tf.ones_like(ss, dtype=tf.bool), [[1, 1], [1, 1], [0, 0]])
    return tf.where(interior, inner, tf.cast(image, tf.uint8))

  h, w = image.shape[0], image.shape[1]
  if h is not None and w is not None:
    return filtered() if h >= 3 and w >= 3 else tf.cast(image, tf.uint8)  # PIL copies small images
  shape = tf.shape(image)
  return tf.cond((shape[0] >= 3) & (shape[1] >= 3), filtered, lambda: tf.cast(image, tf.uint8))


def sharpness(image, factor, *, fill=FILL):
  """ImageEnhance.Sharpness: blend with image.filter(ImageFilter.SMOOTH)."""
  return _blend(_smooth(image), image, factor)


# ----------------------------------------------------------------------------------- geometric


def _cubic(v1, v2, v3, v4, d):
  """Pillow Geometry.c BICUBIC macro (a = -1 cubic convolution), same float64 operation order."""
  p1 = v2
  p2 = -v1 + v3
  p3 = 2.0 * (v1 - v2) + v3 - v4
  p4 = -v1 + v2 - v3 + v4
  return p1 + d * (p2 + d * (p3 + d * p4))


def affine_transform(image, matrix: Sequence[Any], *, fill=FILL):
  """PIL ``image.transform(image.size, Image.AFFINE, matrix, resample=BICUBIC, fillcolor=fill)``.

  matrix: 6 floats (a, b, c, d, e, f) mapping the OUTPUT pixel centre (x + 0.5, y + 0.5) to the
  source point (a x + b y + c, d x + e y + f), in pixels. image: uint8 (H, W, 3) -> uint8
  (H, W, 3). Pixels whose source point lies outside [0, W) x [0, H) get `fill` (3 ints).
  """
  tf = _tf()
  image = tf.convert_to_tensor(image)
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  a, b, c, d, e, f = (tf.cast(m, tf.float64) for m in matrix)
  hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
  # Full (H, W) grids so every sum has equal shapes (no broadcast-driven reordering of adds).
  gx = tf.broadcast_to((tf.cast(tf.range(w), tf.float64) + 0.5)[None, :], [h, w])
  gy = tf.broadcast_to((tf.cast(tf.range(h), tf.float64) + 0.5)[:, None], [h, w])
  xin = a * gx + b * gy + c
  yin = d * gx + e * gy + f
  inside = (xin >= 0.0) & (xin < wf) & (yin >= 0.0) & (yin < hf)
  xin = xin - 0.5
  yin = yin - 0.5
  fx, fy = tf.floor(xin), tf.floor(yin)
  dx, dy = (xin - fx)[..., None], (yin - fy)[..., None]
  # The clip only keeps the int cast in range for far-away (masked) source points.
  x0 = tf.cast(tf.clip_by_value(fx, -2.0, wf), tf.int32) - 1
  y0 = tf.cast(tf.clip_by_value(fy, -2.0, hf), tf.int32) - 1
  flat = tf.reshape(tf.cast(image, tf.float64), [-1, 3])
  cols = [tf.clip_by_value(x0 + k, 0, w - 1) for k in range(4)]
  rows = [tf.clip_by_value(y0 + k, 0, h - 1) * w for k in range(4)]  # Pillow clamps to the edge
  v = [_cubic(*[tf.gather(flat, r + col) for col in cols], dx) for r in rows]
  out = _floor_u8(_cubic(*v, dy))
  fill = tf.reshape(tf.cast(tf.constant(fill), tf.uint8), [3])
  out = tf.where(inside[..., None], out, fill)
  return tf.ensure_shape(out, image.shape)


def rotate(image, degrees, *, fill=FILL):
  """PIL ``image.rotate(degrees, resample=BICUBIC, fillcolor=fill)``: counter-clockwise, about
  the image centre (W/2, H/2), same size. degrees: float."""
  tf = _tf()
  shape = tf.shape(image)
  cx = tf.cast(shape[1], tf.float64) / 2.0
  cy = tf.cast(shape[0], tf.float64) / 2.0
  angle = -(tf.math.floormod(tf.cast(degrees, tf.float64), 360.0) * _DEG_TO_RAD)
  cos = tf.round(tf.cos(angle) * 1e15) / 1e15  # Pillow rounds to 15 decimals
  sin = tf.round(tf.sin(angle) * 1e15) / 1e15
  c = cos * -cx + sin * -cy + 0.0 + cx
  f = -sin * -cx + cos * -cy + 0.0 + cy
  return affine_transform(image, (cos, sin, c, -sin, cos, f), fill=fill)


def shear_x(image, factor, *, fill=FILL):
  """timm shear_x: affine (1, factor, 0, 0, 1, 0), bicubic."""
  return affine_transform(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill=fill)


def shear_y(image, factor, *, fill=FILL):
  """timm shear_y: affine (1, 0, 0, factor, 1, 0), bicubic."""
  return affine_transform(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill=fill)


def translate_x_rel(image, pct, *, fill=FILL):
  """timm translate_x_rel: affine (1, 0, pct * W, 0, 1, 0), bicubic (content moves left)."""
  tf = _tf()
  pixels = tf.cast(pct, tf.float64) * tf.cast(tf.shape(image)[1], tf.float64)
  return affine_transform(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill=fill)


def translate_y_rel(image, pct, *, fill=FILL):
  """timm translate_y_rel: affine (1, 0, 0, 0, 1, pct * H), bicubic (content moves up)."""
  tf = _tf()
  pixels = tf.cast(pct, tf.float64) * tf.cast(tf.shape(image)[0], tf.float64)
  return affine_transform(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill=fill)


# ------------------------------------------------------------------------------- ops and levels

# name -> fn(image uint8 (H, W, 3), arg, *, fill) -> uint8 (H, W, 3); arg is the op argument
# after timm's level rule (None for the argument-free ops), deterministic.
OPS: dict[str, Callable[..., Any]] = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "Rotate": rotate,
    "Posterize": posterize,
    "PosterizeIncreasing": posterize,
    "Solarize": solarize,
    "SolarizeIncreasing": solarize,
    "SolarizeAdd": solarize_add,
    "Color": color,
    "ColorIncreasing": color,
    "Contrast": contrast,
    "ContrastIncreasing": contrast,
    "Brightness": brightness,
    "BrightnessIncreasing": brightness,
    "Sharpness": sharpness,
    "SharpnessIncreasing": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateXRel": translate_x_rel,
    "TranslateYRel": translate_y_rel,
}


def _check_op(name: str) -> None:
  if name not in OPS:
    raise ValueError(f"op {name!r} is not valid: expected one of {sorted(OPS)}")


def level_to_arg(name: str, magnitude, negate=False, *, translate_pct=DEFAULT_TRANSLATE_PCT):
  """timm 0.3.2 LEVEL_TO_ARG[name] at level = clip(magnitude, 0, 10), in float64.

  negate (bool, Python or tensor) plays timm's _randomly_negate outcome for the signed ops
  (Rotate degrees, Shear factor, TranslateRel fraction of the image size, *Increasing enhance
  offset from 1). Returns None for AutoContrast/Equalize/Invert, an int32 scalar for
  Posterize*/Solarize*/SolarizeAdd (bits, threshold, addend) and a float64 scalar otherwise.
  """
  _check_op(name)
  if name in ("AutoContrast", "Equalize", "Invert"):
    return None
  tf = _tf()
  # DivNoNan (not RealDiv) and a select for the sign (not a product): grappler's constant
  # push-down rewrites (x / 10) * k into x * (k / 10) in graphs, which changes the last bit.
  frac = tf.math.divide_no_nan(
      tf.clip_by_value(tf.cast(magnitude, tf.float64), 0.0, MAX_LEVEL), MAX_LEVEL)
  negate = tf.cast(negate, tf.bool)

  def signed(v):
    return tf.where(negate, -v, v)

  def trunc(v):
    return tf.cast(tf.floor(v), tf.int32)  # int() of a non-negative float

  if name == "Rotate":
    return signed(frac * 30.0)
  if name in ("ShearX", "ShearY"):
    return signed(frac * 0.3)
  if name in ("TranslateXRel", "TranslateYRel"):
    return signed(frac * float(translate_pct))
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return frac * 1.8 + 0.1
  if name.endswith("Increasing") and not name.startswith(("Posterize", "Solarize")):
    return 1.0 + signed(frac * 0.9)
  if name == "Posterize":
    return trunc(frac * 4.0)
  if name == "PosterizeIncreasing":
    return 4 - trunc(frac * 4.0)
  if name == "Solarize":
    return trunc(frac * 256.0)
  if name == "SolarizeIncreasing":
    return 256 - trunc(frac * 256.0)
  return trunc(frac * 110.0)  # SolarizeAdd


def apply_op(image, name: str, magnitude, *, negate=False, fill=FILL,
             translate_pct=DEFAULT_TRANSLATE_PCT):
  """Deterministic single RandAugment op: timm's level rule at `magnitude`, then the op.

  image: uint8 (H, W, 3). magnitude: level in [0, 10] units (clipped). negate: the outcome of
  timm's random sign (signed ops only). Returns uint8 (H, W, 3).
  """
  _check_op(name)
  arg = level_to_arg(name, magnitude, negate, translate_pct=translate_pct)
  return OPS[name](image, arg, fill=fill)


# ---------------------------------------------------------------------------------- RandAugment


def rand_augment_params(seed, config: RandAugmentConfig) -> dict[str, Any]:
  """The random draws of one `rand_augment` call (all stateless in `seed`), shape [num_ops] each.

  op: int32 index into config.op_names (uniform, with replacement); apply: bool (U < prob, i.e.
  not timm's U > prob skip); magnitude: float64 N(magnitude, magnitude_std) clipped to [0, 10];
  negate: bool (U > 0.5, timm's _randomly_negate).
  """
  tf = _tf()
  n = config.num_ops
  seed = tf.convert_to_tensor(seed)
  if n == 0:
    return {"op": tf.zeros([0], tf.int32), "apply": tf.zeros([0], tf.bool),
            "magnitude": tf.zeros([0], tf.float64), "negate": tf.zeros([0], tf.bool)}
  k_op, k_apply, k_mag, k_neg = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  op = tf.random.stateless_uniform([n], seed=k_op, minval=0, maxval=len(config.op_names),
                                   dtype=tf.int32)
  apply = tf.random.stateless_uniform([n], seed=k_apply, dtype=tf.float64) <= config.prob
  magnitude = tf.fill([n], tf.constant(float(config.magnitude), tf.float64))
  if config.magnitude_std > 0:
    magnitude += config.magnitude_std * tf.random.stateless_normal([n], seed=k_mag,
                                                                   dtype=tf.float64)
  magnitude = tf.clip_by_value(magnitude, 0.0, MAX_LEVEL)
  negate = tf.random.stateless_uniform([n], seed=k_neg, dtype=tf.float64) > 0.5
  return {"op": op, "apply": apply, "magnitude": magnitude, "negate": negate}


def rand_augment(image, seed, config: RandAugmentConfig = RandAugmentConfig(), *, fill=FILL,
                 translate_pct=DEFAULT_TRANSLATE_PCT):
  """timm RandAugment on one uint8 image (H, W, 3), driven only by the stateless `seed` ([2] int).

  Returns uint8 (H, W, 3) with image's static shape. Graph-safe (tf.data map): only the drawn op
  runs (tf.switch_case).
  """
  tf = _tf()
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise ValueError(f"image dtype {image.dtype.name} is not valid: expected uint8 (H, W, 3)")
  params = rand_augment_params(seed, config)
  names = config.op_names
  for i in range(config.num_ops):
    mag, neg = params["magnitude"][i], params["negate"][i]
    branches = [
        (lambda name=name, img=image: apply_op(img, name, mag, negate=neg, fill=fill,
                                               translate_pct=translate_pct))
        for name in names
    ] + [lambda img=image: img]  # last branch: op skipped
    index = tf.where(params["apply"][i], params["op"][i], len(names))
    image = tf.ensure_shape(tf.switch_case(index, branches), image.shape)
  return image


# ----------------------------------------------------------------------------- RandomErasing


def random_erasing(image, seed, *, probability=0.25, min_area=0.02, max_area=1 / 3,
                   min_aspect=0.3):
  """timm RandomErasing(probability, mode='pixel', max_count=1) on one normalized image.

  image: float (H, W, 3), already mean/std normalized. With probability `probability` one box is
  replaced by N(0, 1) noise per pixel and channel: of 10 tries (target area U(min_area,
  max_area) * H * W, aspect exp(U(log min_aspect, -log min_aspect)), h = round(sqrt(area *
  aspect)), w = round(sqrt(area / aspect))) the first with h < H and w < W is used, at a uniform
  top in [0, H - h] and left in [0, W - w]; if none fits, nothing changes. Returns float32
  (H, W, 3); all pixels outside the box are the input's bit for bit.
  """
  if not 0.0 <= probability <= 1.0:
    raise ValueError(f"probability={probability!r} is not valid: expected a number in [0, 1]")
  if not 0.0 < min_area <= max_area:
    raise ValueError(f"min_area={min_area!r}, max_area={max_area!r} are not valid: expected "
                     "0 < min_area <= max_area (fractions of the image area)")
  if not min_aspect > 0:
    raise ValueError(f"min_aspect={min_aspect!r} is not valid: expected a number > 0")
  tf = _tf()
  image = tf.cast(tf.convert_to_tensor(image), tf.float32)
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  k_apply, k_box, k_pos, k_noise = tf.unstack(
      tf.random.experimental.stateless_split(tf.convert_to_tensor(seed), 4))
  erase = tf.random.stateless_uniform([], seed=k_apply, dtype=tf.float64) <= probability
  u = tf.random.stateless_uniform([_ERASE_TRIES, 2], seed=k_box, dtype=tf.float64)
  area = tf.cast(h * w, tf.float64) * (min_area + (max_area - min_area) * u[:, 0])
  log_lo, log_hi = math.log(min_aspect), math.log(1.0 / min_aspect)
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[:, 1])
  bh = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)  # round half to even, as Python
  bw = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (bw < w) & (bh < h)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  bh, bw = bh[first], bw[first]
  v = tf.random.stateless_uniform([2], seed=k_pos, dtype=tf.float64)
  top = tf.minimum(tf.cast(tf.floor(v[0] * tf.cast(h - bh + 1, tf.float64)), tf.int32), h - bh)
  left = tf.minimum(tf.cast(tf.floor(v[1] * tf.cast(w - bw + 1, tf.float64)), tf.int32), w - bw)
  ys = tf.range(h)[:, None]
  xs = tf.range(w)[None, :]
  box = (ys >= top) & (ys < top + bh) & (xs >= left) & (xs < left + bw)
  box = box & erase & tf.reduce_any(fits)
  noise = tf.random.stateless_normal(shape, seed=k_noise, dtype=tf.float32)
  return tf.ensure_shape(tf.where(box[..., None], noise, image), image.shape)
