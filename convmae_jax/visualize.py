"""Reconstruction figures for masked autoencoders (pure numpy + PIL; no jax/tf needed).

Layout (one row per sample): original | masked (removed patches grey) | reconstruction (the
visible patches of the original pasted over the prediction, as in MAE's figures) | raw prediction
(optional).

Conventions (the model's, see docs/internals.md):
  * ``images``: (N, H, W, 3), ImageNet mean/std normalized, NHWC;
  * ``pred``: (N, L, p*p*3), L = (H/p)*(W/p) tokens in row-major order, features in (p, q, c) order
    (``models.patchify``);
  * ``mask``: (N, L), 1 = removed (predicted), 0 = visible.

With ``norm_pix_loss`` the model predicts each patch normalized by the target patch's own mean and
unbiased variance, so the prediction is mapped back with ``pred * sqrt(var + 1e-6) + mean``, per
patch of the original normalized image, before ImageNet denormalization.
"""

from __future__ import annotations

import os

import numpy as np

from convmae_jax.data.pipeline import IMAGENET_MEAN, IMAGENET_STD  # one definition of the stats
NORM_PIX_EPS = 1e-6
MASK_GREY = 128.0
COLUMNS = ("original", "masked", "reconstruction", "prediction")


def patchify(images: np.ndarray, patch_size: int) -> np.ndarray:
  """(N, H, W, C) -> (N, (H/p)*(W/p), p*p*C); tokens row-major, features in (p, q, c) order."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"image size {(h, w)} is not a multiple of patch_size={p}")
  x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: np.ndarray, patch_size: int, *, height: int | None = None,
               width: int | None = None, channels: int = 3) -> np.ndarray:
  """Inverse of `patchify`: (N, L, p*p*C) -> (N, H, W, C). Square unless height/width are given."""
  x = np.asarray(x)
  n, length, dim = x.shape
  p = patch_size
  if height is None or width is None:
    g = int(round(length ** 0.5))
    gh = gw = g
  else:
    gh, gw = height // p, width // p
  if gh * gw != length or dim != p * p * channels:
    raise ValueError(f"cannot unpatchify shape {x.shape} with patch_size={p}, channels={channels}"
                     f" and a {gh}x{gw} patch grid")
  x = x.reshape(n, gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, gh * p, gw * p, channels)


def _check(images, pred, mask, patch_size):
  if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size <= 0:
    raise ValueError(f"patch_size={patch_size!r} is not valid: expected a positive integer")
  images = np.asarray(images, dtype=np.float32)
  pred = np.asarray(pred, dtype=np.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be (N, H, W, 3) normalized NHWC, got shape {images.shape}")
  n, h, w, _ = images.shape
  if h % patch_size or w % patch_size:
    raise ValueError(f"image size {(h, w)} is not a multiple of patch_size={patch_size}")
  length = (h // patch_size) * (w // patch_size)
  dim = patch_size * patch_size * 3
  if pred.shape != (n, length, dim):
    raise ValueError(f"pred must have shape (N, L, p*p*3) = {(n, length, dim)} for images "
                     f"{images.shape} and patch_size={patch_size}, got {pred.shape}")
  if mask is None:
    return images, pred, None
  mask = np.asarray(mask, dtype=np.float32)
  if mask.shape != (n, length):
    raise ValueError(f"mask must have shape (N, L) = {(n, length)}, got {mask.shape}")
  return images, pred, mask


def unnormalize_prediction(images, pred, *, patch_size: int, norm_pix_loss: bool) -> np.ndarray:
  """Prediction as an image in the input's (ImageNet-normalized) space: (N, H, W, 3) float32.

  With norm_pix_loss each predicted patch is mapped back with the target patch's own statistics:
  ``pred * sqrt(var + 1e-6) + mean`` (var unbiased, over the p*p*3 values of the patch).
  """
  images, pred, _ = _check(images, pred, None, patch_size)
  if norm_pix_loss:
    target = patchify(images, patch_size).astype(np.float64)
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, ddof=1, keepdims=True)
    pred = pred.astype(np.float64) * np.sqrt(var + NORM_PIX_EPS) + mean
  n, h, w, _ = images.shape
  return unpatchify(pred, patch_size, height=h, width=w).astype(np.float32)


def _to_pixels(normalized: np.ndarray) -> np.ndarray:
  """ImageNet-normalized -> float [0, 255] (clipped, not rounded)."""
  return np.clip((normalized * IMAGENET_STD + IMAGENET_MEAN) * 255.0, 0.0, 255.0)


def reconstruction_columns(images, pred, mask, *, patch_size: int, norm_pix_loss: bool,
                           show_prediction: bool = True) -> np.ndarray:
  """The figure's panels as float32 in [0, 255]: (N, C, H, W, 3), C = 4 (or 3 without the raw
  prediction), in the order of `COLUMNS`."""
  images, pred, mask = _check(images, pred, mask, patch_size)
  n, h, w, _ = images.shape
  recon = unnormalize_prediction(images, pred, patch_size=patch_size, norm_pix_loss=norm_pix_loss)
  m = unpatchify(np.repeat(mask[..., None], patch_size * patch_size * 3, axis=-1), patch_size,
                 height=h, width=w)  # (N, H, W, 3), 1 = removed
  original = _to_pixels(images)
  prediction = _to_pixels(recon)
  masked = original * (1.0 - m) + MASK_GREY * m
  pasted = original * (1.0 - m) + prediction * m
  cols = [original, masked, pasted] + ([prediction] if show_prediction else [])
  return np.stack(cols, axis=1).astype(np.float32)


def tile(panels: np.ndarray, *, pad: int = 2, pad_value: int = 255) -> np.ndarray:
  """(rows, cols, H, W, 3) float/uint8 -> one uint8 image with `pad` pixels between tiles."""
  panels = np.asarray(panels)
  rows, cols, h, w, c = panels.shape
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, dtype=np.uint8)
  tiles = np.clip(np.round(panels.astype(np.float32)), 0, 255).astype(np.uint8)
  for r in range(rows):
    for k in range(cols):
      y, x = pad + r * (h + pad), pad + k * (w + pad)
      grid[y:y + h, x:x + w] = tiles[r, k]
  return grid


def reconstruction_grid(images, pred, mask, *, patch_size: int, norm_pix_loss: bool,
                        show_prediction: bool = True, pad: int = 2) -> np.ndarray:
  """uint8 (H_grid, W_grid, 3) figure: one row per sample; columns original | masked |
  reconstruction (visible patches pasted) | raw prediction (if show_prediction).

  H_grid = N*(H+pad)+pad, W_grid = C*(W+pad)+pad with C = 4 (3 without the raw prediction).
  """
  cols = reconstruction_columns(images, pred, mask, patch_size=patch_size,
                                norm_pix_loss=norm_pix_loss, show_prediction=show_prediction)
  return tile(cols, pad=pad)


def save_png(array: np.ndarray, path: str | os.PathLike) -> str:
  """Writes a uint8 (H, W), (H, W, 3) or (H, W, 4) array as PNG (parent dirs created)."""
  from PIL import Image

  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f"save_png expects a uint8 array, got dtype {array.dtype} "
                     "(convert with np.clip(np.round(x), 0, 255).astype(np.uint8))")
  if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4))):
    raise ValueError(f"save_png expects (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  Image.fromarray(array).save(path, format="PNG")
  return path
