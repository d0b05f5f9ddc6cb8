"""Mixup / CutMix of the fine-tuning recipe: timm 0.3.2 ``Mixup`` in ``mode='batch'``, keyed.

One mixing decision per batch: with probability ``prob`` the batch is mixed with its own reverse
(``x[::-1]``), by Mixup (convex combination) or CutMix (a pasted box), chosen with probability
``switch_prob``; targets are the matching mix of label-smoothed one-hots. The same key gives the
same result; everything is traced (jit with N, H, W static), nothing branches on values.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from convmae_jax.train.losses import smoothed_one_hot


def _check(n: int, mixup_alpha: float, cutmix_alpha: float, switch_prob: float, prob: float,
           label_smoothing: float, num_classes: int) -> None:
  """ValueError naming the bad value (timm asserts an even batch and one positive alpha)."""
  if n % 2:
    raise ValueError(f"mixup_cutmix needs an even batch size (the batch is mixed with its "
                     f"reverse, as timm asserts), got {n}")
  if mixup_alpha < 0 or cutmix_alpha < 0:
    raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got mixup_alpha={mixup_alpha}, "
                     f"cutmix_alpha={cutmix_alpha}")
  if prob > 0 and mixup_alpha == 0 and cutmix_alpha == 0:
    raise ValueError("one of mixup_alpha, cutmix_alpha must be > 0 when prob > 0 (both are 0); "
                     "use prob=0 for label smoothing alone")
  for name, value in (("switch_prob", switch_prob), ("prob", prob),
                      ("label_smoothing", label_smoothing)):
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"{name} must lie in [0, 1], got {value}")
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")


def _rand_bbox(key: jax.Array, lam: jax.Array, h: int, w: int) -> tuple[jax.Array, ...]:
  """timm ``rand_bbox``: a box of sides ``int(H*sqrt(1-lam))``, ``int(W*sqrt(1-lam))`` centred at a
  uniform pixel, clipped to the image. Returns int32 scalars (yl, yh, xl, xh), half-open."""
  ky, kx = jax.random.split(key)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(h * ratio).astype(jnp.int32)  # int() of a non-negative float
  cut_w = jnp.floor(w * ratio).astype(jnp.int32)
  cy = jax.random.randint(ky, (), 0, h)  # [0, H), as np.random.randint
  cx = jax.random.randint(kx, (), 0, w)
  yl = jnp.clip(cy - cut_h // 2, 0, h)
  yh = jnp.clip(cy + cut_h // 2, 0, h)
  xl = jnp.clip(cx - cut_w // 2, 0, w)
  xh = jnp.clip(cx + cut_w // 2, 0, w)
  return yl, yh, xl, xh


def mixup_cutmix(key: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
                 prob: float = 1.0, label_smoothing: float = 0.1,
                 correct_lam: bool = True) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
  """Mixes a batch with its reverse; returns ``(mixed_images, soft_targets, info)``.

  images: (N, H, W, C) float NHWC, N even. labels: (N,) int class ids.
  mixed_images: (N, H, W, C), images' dtype. soft_targets: (N, num_classes) float32, rows sum to 1.
  info: ``lam`` () float32 (weight of the original image and label), ``use_cutmix`` () bool,
  ``box`` (yl, yh, xl, xh) int32 scalars, the half-open pasted rows/columns (all 0 unless CutMix).

  timm semantics: with probability ``prob`` the batch is mixed, else lam = 1 (images unchanged,
  targets = smoothed one-hot). With both alphas > 0, CutMix with probability ``switch_prob`` and
  lam ~ Beta(cutmix_alpha), else Mixup with lam ~ Beta(mixup_alpha); with one alpha > 0 only that
  one. Mixup: ``lam * x + (1 - lam) * x[::-1]``. CutMix: the box of :func:`_rand_bbox` is copied
  from ``x[::-1]``; with ``correct_lam`` lam becomes ``1 - box_area / (H * W)`` (exact when the
  box is clipped at the border). Targets: ``lam * y + (1 - lam) * y[::-1]`` with smoothed one-hots
  (off = smoothing / num_classes, on = 1 - smoothing + off).

  The alphas, probabilities and ``num_classes`` are Python numbers (static under jit).
  Raises ValueError for an odd batch, a negative alpha, both alphas 0 with ``prob`` > 0, or a
  probability outside [0, 1].
  """
  mixup_alpha, cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
  switch_prob, prob, label_smoothing = float(switch_prob), float(prob), float(label_smoothing)
  if images.ndim != 4:
    raise ValueError(f"images must be (N, H, W, C), got shape {tuple(images.shape)}")
  n, h, w, _ = images.shape
  if tuple(labels.shape) != (n,):
    raise ValueError(f"labels must be ({n},) to match images, got shape {tuple(labels.shape)}")
  _check(n, mixup_alpha, cutmix_alpha, switch_prob, prob, label_smoothing, num_classes)

  k_prob, k_switch, k_mix, k_cut, k_box = jax.random.split(key, 5)
  do_mix = jax.random.uniform(k_prob) < prob
  # Which kind and its Beta draw; the alphas are static, so only positive ones are sampled.
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
    lam_mix = jnp.where(use_cutmix, jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha),
                        jax.random.beta(k_mix, mixup_alpha, mixup_alpha))
  elif cutmix_alpha > 0:
    use_cutmix = jnp.asarray(True)
    lam_mix = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha)
  else:  # Mixup only; or neither, allowed only with prob == 0 (lam stays 1)
    use_cutmix = jnp.asarray(False)
    lam_mix = (jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0
               else jnp.asarray(1.0))
  lam_mix = lam_mix.astype(jnp.float32)
  use_cutmix = jnp.logical_and(do_mix, use_cutmix)

  # CutMix box; an empty box (all 0) when not cutting, so info and the paste agree.
  yl, yh, xl, xh = _rand_bbox(k_box, lam_mix, h, w)
  yl, yh, xl, xh = (jnp.where(use_cutmix, v, 0).astype(jnp.int32) for v in (yl, yh, xl, xh))
  area = ((yh - yl) * (xh - xl)).astype(jnp.float32)
  lam_cut = 1.0 - area / float(h * w) if correct_lam else lam_mix
  lam = jnp.where(do_mix, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)

  flipped = images[::-1]
  rows, cols = jnp.arange(h), jnp.arange(w)
  in_box = (((rows >= yl) & (rows < yh))[:, None] & ((cols >= xl) & (cols < xh))[None, :])
  cut = jnp.where(in_box[None, :, :, None], flipped, images)  # bit-exact copy of the box
  lam_x = lam.astype(images.dtype)
  mixed = lam_x * images + (1 - lam_x) * flipped
  # Unmixed batches pass through untouched (no lam=1 arithmetic on them).
  out = jnp.where(use_cutmix, cut, jnp.where(do_mix, mixed, images))

  y1 = smoothed_one_hot(labels, num_classes, label_smoothing)
  targets = lam * y1 + (1.0 - lam) * y1[::-1]
  info = {"lam": lam, "use_cutmix": use_cutmix, "box": (yl, yh, xl, xh)}
  return out, targets, info
