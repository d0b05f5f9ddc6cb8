"""Mixup/CutMix against timm 0.3.2 ``Mixup(mode='batch')`` semantics, on small NHWC batches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convmae_jax.train.mixup import mixup_cutmix

N, H, W, C, K = 4, 8, 6, 3, 5   # non-square so rows and columns cannot be swapped unnoticed
SMOOTH = 0.1


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(N, H, W, C)).astype(np.float32)
  labels = np.array([0, 3, 1, 4], np.int32)
  return images, labels


def _one_hot(labels, smoothing=SMOOTH):
  off = smoothing / K
  y = np.full((len(labels), K), off)
  y[np.arange(len(labels)), labels] = 1 - smoothing + off
  return y


def _mix(key, images, labels, **kw):
  fn = jax.jit(functools.partial(mixup_cutmix, num_classes=K, label_smoothing=SMOOTH, **kw))
  out, targets, info = fn(key, jnp.asarray(images), jnp.asarray(labels))
  info = {"lam": float(info["lam"]), "use_cutmix": bool(info["use_cutmix"]),
          "box": tuple(int(v) for v in info["box"])}
  return np.asarray(out), np.asarray(targets), info


def _check_targets(targets, labels, lam):
  y = _one_hot(labels)
  np.testing.assert_allclose(targets, lam * y + (1 - lam) * y[::-1], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


def test_mixup_is_the_convex_combination_with_the_reversed_batch():
  images, labels = _batch()
  out, targets, info = _mix(jax.random.key(0), images, labels, cutmix_alpha=0.0)
  lam = info["lam"]
  assert not info["use_cutmix"] and info["box"] == (0, 0, 0, 0) and 0.0 < lam < 1.0
  np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], rtol=1e-6, atol=1e-6)
  _check_targets(targets, labels, lam)


def test_cutmix_pastes_the_reversed_batch_inside_the_box_only():
  images, labels = _batch()
  out, targets, info = _mix(jax.random.key(1), images, labels, mixup_alpha=0.0)
  yl, yh, xl, xh = info["box"]
  assert info["use_cutmix"] and yh > yl and xh > xl
  inside = np.zeros((H, W), bool)
  inside[yl:yh, xl:xh] = True
  np.testing.assert_array_equal(out[:, inside], images[::-1][:, inside])   # bit for bit
  np.testing.assert_array_equal(out[:, ~inside], images[:, ~inside])
  assert info["lam"] == pytest.approx(1 - (yh - yl) * (xh - xl) / (H * W), abs=1e-7)
  _check_targets(targets, labels, info["lam"])


def test_cutmix_lam_is_corrected_for_a_box_clipped_at_the_border():
  images, labels = _batch()
  for seed in range(200):      # find a key whose box is clipped (the centre near an edge)
    key = jax.random.key(seed)
    out, targets, info = _mix(key, images, labels, mixup_alpha=0.0)
    _, _, raw = _mix(key, images, labels, mixup_alpha=0.0, correct_lam=False)
    lam_mix = raw["lam"]        # the Beta draw itself: same key, same draw and box
    ratio = np.sqrt(1 - lam_mix)
    cut_h, cut_w = int(H * ratio), int(W * ratio)
    yl, yh, xl, xh = info["box"]
    if (yh - yl, xh - xl) != (2 * (cut_h // 2), 2 * (cut_w // 2)) and yh > yl and xh > xl:
      break  # seed 0 at the time of writing: box (1, 7, 0, 3), drawn 6x4
  else:
    pytest.fail("no clipped box in 200 keys")
  assert raw["box"] == info["box"]
  assert 0 <= yl <= yh <= H and 0 <= xl <= xh <= W and (yl == 0 or yh == H or xl == 0 or xh == W)
  area = (yh - yl) * (xh - xl)
  assert info["lam"] == pytest.approx(1 - area / (H * W), abs=1e-7)
  # The clipped box is smaller than the drawn one, so the corrected lam is larger.
  assert info["lam"] > 1 - (2 * (cut_h // 2)) * (2 * (cut_w // 2)) / (H * W)
  _check_targets(targets, labels, info["lam"])
  inside = np.zeros((H, W), bool)
  inside[yl:yh, xl:xh] = True
  np.testing.assert_array_equal(out[:, inside], images[::-1][:, inside])
  np.testing.assert_array_equal(out[:, ~inside], images[:, ~inside])


def test_switch_and_mix_probabilities():
  images, labels = _batch()
  keys = jax.random.split(jax.random.key(3), 4000)
  fn = functools.partial(mixup_cutmix, num_classes=K, switch_prob=0.3, prob=0.8)
  _, targets, info = jax.jit(jax.vmap(fn, in_axes=(0, None, None)))(keys, jnp.asarray(images),
                                                                     jnp.asarray(labels))
  use_cutmix, lam = np.asarray(info["use_cutmix"]), np.asarray(info["lam"])
  # CutMix with prob * switch_prob; Mixup (lam < 1 a.s.) with prob * (1 - switch_prob). lam
  # cannot tell CutMix apart: a small box rounds to an empty one (lam 1) on an 8x6 image.
  # Binomial standard errors ~0.007 and ~0.008.
  assert use_cutmix.mean() == pytest.approx(0.8 * 0.3, abs=0.03)
  assert (~use_cutmix & (lam < 1.0)).mean() == pytest.approx(0.8 * 0.7, abs=0.03)
  box = np.stack([np.asarray(v) for v in info["box"]], -1)
  assert (box[~use_cutmix] == 0).all()                     # no box unless CutMix
  np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-5)


def test_prob_zero_leaves_images_and_gives_smoothed_one_hot():
  images, labels = _batch()
  out, targets, info = _mix(jax.random.key(4), images, labels, prob=0.0)
  np.testing.assert_array_equal(out, images)
  np.testing.assert_allclose(targets, _one_hot(labels), rtol=1e-6)
  assert info["lam"] == 1.0 and not info["use_cutmix"]


def test_bad_arguments_raise_before_compute():
  images, labels = _batch()
  with pytest.raises(ValueError, match="even batch size.*got 3"):
    mixup_cutmix(jax.random.key(0), images[:3], labels[:3], num_classes=K)
  with pytest.raises(ValueError, match="mixup_alpha=-0.5"):
    mixup_cutmix(jax.random.key(0), images, labels, num_classes=K, mixup_alpha=-0.5)
  with pytest.raises(ValueError, match="both are 0"):
    mixup_cutmix(jax.random.key(0), images, labels, num_classes=K, mixup_alpha=0, cutmix_alpha=0)
