"""Tests for convmae_jax.visualize (pure numpy)."""

import numpy as np
import pytest
from PIL import Image

from convmae_jax import visualize as vis

MEAN = vis.IMAGENET_MEAN
STD = vis.IMAGENET_STD


def _images(n=2, size=32, seed=0):
  rng = np.random.default_rng(seed)
  pix = rng.integers(0, 256, size=(n, size, size, 3)).astype(np.float32)
  # Make some patches flat to exercise the eps of the per-patch variance.
  pix[0, :8, :8] = 77.0
  return pix, ((pix / 255.0 - MEAN) / STD).astype(np.float32)


def _norm_target(images, p):
  t = vis.patchify(images, p).astype(np.float64)
  mean = t.mean(-1, keepdims=True)
  var = t.var(-1, ddof=1, keepdims=True)
  return ((t - mean) / np.sqrt(var + 1e-6)).astype(np.float32)


def test_patchify_order_and_roundtrip():
  p = 4
  x = np.arange(1 * 8 * 12 * 3, dtype=np.float32).reshape(1, 8, 12, 3)
  t = vis.patchify(x, p)
  assert t.shape == (1, 2 * 3, p * p * 3)
  # token index = h*W' + w; feature index = (row*p + col)*3 + c
  h, w, row, col, c = 1, 2, 3, 1, 2
  assert t[0, h * 3 + w, (row * p + col) * 3 + c] == x[0, h * p + row, w * p + col, c]
  np.testing.assert_array_equal(vis.unpatchify(t, p, height=8, width=12), x)
  sq = np.random.default_rng(0).normal(size=(2, 16, 16, 3))
  np.testing.assert_array_equal(vis.unpatchify(vis.patchify(sq, 4), 4), sq)


def test_patchify_matches_model_patchify():
  try:
    from convmae_jax import models
    fn = models.patchify
  except Exception as e:  # the model package is developed in parallel
    pytest.skip(f"convmae_jax.models.patchify not importable: {e}")
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(fn(x, 16)), vis.patchify(x, 16))


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_perfect_prediction_reconstructs_original(norm_pix_loss):
  p = 8
  pix, images = _images()
  pred = _norm_target(images, p) if norm_pix_loss else vis.patchify(images, p)
  mask = np.zeros((2, 16), np.float32)
  mask[:, ::2] = 1.0
  cols = vis.reconstruction_columns(images, pred, mask, patch_size=p, norm_pix_loss=norm_pix_loss)
  assert cols.shape == (2, 4, 32, 32, 3) and cols.dtype == np.float32
  original, masked, pasted, prediction = (cols[:, k] for k in range(4))
  assert np.abs(original - pix).max() < 1e-3
  assert np.abs(pasted - pix).max() < 1e-3
  assert np.abs(prediction - pix).max() < 1e-3
  grid = vis.reconstruction_grid(images, pred, mask, patch_size=p, norm_pix_loss=norm_pix_loss)
  assert grid.dtype == np.uint8 and grid.shape == (2 * 34 + 2, 4 * 34 + 2, 3)
  tile = grid[2:34, 2 + 2 * 34:2 + 2 * 34 + 32]  # row 0, reconstruction column
  assert np.abs(tile.astype(int) - pix[0].astype(int)).max() <= 1


def test_norm_pix_uses_each_patch_statistics():
  p = 8
  pix, images = _images()
  pred = np.zeros((2, 16, p * p * 3), np.float32)  # zero = each target patch's own mean
  rec = vis.unnormalize_prediction(images, pred, patch_size=p, norm_pix_loss=True)
  patch_means = vis.patchify(images, p).mean(-1)
  np.testing.assert_allclose(vis.patchify(rec, p), np.repeat(patch_means[..., None], p * p * 3, -1),
                             atol=1e-5)
  rec_raw = vis.unnormalize_prediction(images, pred, patch_size=p, norm_pix_loss=False)
  np.testing.assert_array_equal(rec_raw, 0.0)


def test_masked_column_and_pasting():
  p = 8
  pix, images = _images()
  pred = np.full((2, 16, p * p * 3), 5.0, np.float32)  # garbage prediction, saturates to 255
  mask = np.zeros((2, 16), np.float32)
  mask[:, 0] = 1.0  # top-left patch removed
  cols = vis.reconstruction_columns(images, pred, mask, patch_size=p, norm_pix_loss=False,
                                    show_prediction=False)
  assert cols.shape == (2, 3, 32, 32, 3)
  masked, pasted = cols[:, 1], cols[:, 2]
  assert (masked[:, :8, :8] == vis.MASK_GREY).all()
  np.testing.assert_allclose(masked[:, 8:], pix[:, 8:], atol=1e-3)
  np.testing.assert_allclose(pasted[:, :, 8:], pix[:, :, 8:], atol=1e-3)  # visible kept
  assert (pasted[:, :8, :8] == 255.0).all()  # removed patch = (clipped) prediction
  grid = vis.reconstruction_grid(images, pred, mask, patch_size=p, norm_pix_loss=False,
                                 show_prediction=False, pad=0)
  assert grid.shape == (64, 96, 3)


def test_bad_arguments():
  _, images = _images()
  mask = np.zeros((2, 16))
  with pytest.raises(ValueError, match="pred must have shape"):
    vis.reconstruction_grid(images, np.zeros((2, 16, 10)), mask, patch_size=8, norm_pix_loss=True)
  with pytest.raises(ValueError, match="mask must have shape"):
    vis.reconstruction_grid(images, np.zeros((2, 16, 192)), np.zeros((2, 15)), patch_size=8,
                            norm_pix_loss=True)
  with pytest.raises(ValueError, match="not a multiple of patch_size=5"):
    vis.reconstruction_grid(images, np.zeros((2, 36, 75)), np.zeros((2, 36)), patch_size=5,
                            norm_pix_loss=True)
  with pytest.raises(ValueError, match="patch_size=0"):
    vis.reconstruction_grid(images, np.zeros((2, 16, 192)), mask, patch_size=0, norm_pix_loss=True)
  with pytest.raises(ValueError, match=r"images must be \(N, H, W, 3\)"):
    vis.reconstruction_grid(images[..., :1], np.zeros((2, 16, 192)), mask, patch_size=8,
                            norm_pix_loss=True)
  with pytest.raises(ValueError, match="uint8"):
    vis.save_png(np.zeros((4, 4, 3), np.float32), "/tmp/never_written.png")


def test_save_png_roundtrip(tmp_path):
  arr = np.random.default_rng(0).integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
  path = vis.save_png(arr, tmp_path / "sub" / "grid.png")
  back = np.asarray(Image.open(path))
  np.testing.assert_array_equal(back, arr)
