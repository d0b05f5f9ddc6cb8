"""Tests for the embedded labelled dataset `convmae_demo_digits` (scikit-learn's digits, offline)."""

import contextlib
import os
import socket
import time

import numpy as np
import pytest

from convmae_jax import data
from convmae_jax.data import demo_digits

DIGITS = "convmae_demo_digits"
# Per-class counts (classes 0..9) of the fixed split test = index % 5 == 0, as in the docstring.
TRAIN_COUNTS = [136, 154, 151, 135, 143, 143, 151, 153, 138, 133]
TEST_COUNTS = [42, 28, 26, 48, 38, 39, 30, 26, 36, 47]
CHECKED_INDICES = (0, 1, 5, 7, 10, 42, 1000, 1795, 1796)


@contextlib.contextmanager
def _no_network():
  def refuse(*args, **kwargs):
    raise OSError("network access attempted in an offline test")

  saved = socket.socket.connect, socket.create_connection, socket.getaddrinfo
  socket.socket.connect, socket.create_connection, socket.getaddrinfo = refuse, refuse, refuse
  try:
    yield
  finally:
    socket.socket.connect, socket.create_connection, socket.getaddrinfo = saved


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  """Builds the digits dataset once (offline, through get_builder) into a fresh TFDS data_dir."""
  d = str(tmp_path_factory.mktemp("tfds_digits"))
  t0 = time.perf_counter()
  with _no_network():
    builder = data.get_builder(DIGITS, data_dir=d)
  build_s = time.perf_counter() - t0
  assert builder.is_prepared()
  assert build_s < 120, f"building the digits dataset took {build_s:.1f}s"
  return d


@pytest.fixture(scope="module")
def splits(digits_dir):
  """{split: (images uint8 (N, 32, 32, 3), labels int64 (N,), indices int64 (N,))}."""
  import tensorflow_datasets as tfds

  builder = tfds.builder(DIGITS, data_dir=digits_dir)
  out = {}
  for split in ("train", "test"):
    ds = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False, batch_size=-1))
    out[split] = (ds["image"], ds["label"].astype(np.int64), ds["index"].astype(np.int64))
  return out


def _reference_image(digit):
  """Recomputes the stored image independently: round half up to 0..255, PIL bicubic 8->32, RGB."""
  from PIL import Image

  grey = np.floor(np.asarray(digit, np.float64) * 255 / 16 + 0.5).astype(np.uint8)
  big = np.asarray(Image.fromarray(grey).resize((32, 32), Image.Resampling.BICUBIC))
  return np.stack([big] * 3, axis=-1)


def test_registered_and_exported():
  assert data.DEMO_DIGITS == DIGITS == demo_digits.NAME
  assert DIGITS in data.EMBEDDED_DATASETS and data.DEMO_DATASET in data.EMBEDDED_DATASETS
  from convmae_jax.train import validation
  assert DIGITS in validation.KNOWN_DATASETS


def test_builds_offline_with_fixed_split_sizes(digits_dir):
  import tensorflow_datasets as tfds

  builder = tfds.builder(DIGITS, data_dir=digits_dir)
  assert builder.info.splits["train"].num_examples == 1437
  assert builder.info.splits["test"].num_examples == 360
  assert builder.info.supervised_keys == ("image", "label")
  assert builder.info.features["label"].names == [str(k) for k in range(10)]
  assert "CC BY 4.0" in builder.info.metadata["license"]
  assert "Alpaydin" in builder.info.citation
  assert data.num_examples(DIGITS, split="test", data_dir=digits_dir) == 360


def test_split_is_index_mod_5_and_per_class_counts(splits):
  from sklearn.datasets import load_digits

  target = load_digits().target
  _, tr_labels, tr_idx = splits["train"]
  _, te_labels, te_idx = splits["test"]
  assert np.all(te_idx % 5 == 0) and np.all(tr_idx % 5 != 0)
  assert sorted(np.concatenate([tr_idx, te_idx]).tolist()) == list(range(1797))
  assert np.bincount(tr_labels, minlength=10).tolist() == TRAIN_COUNTS
  assert np.bincount(te_labels, minlength=10).tolist() == TEST_COUNTS
  np.testing.assert_array_equal(tr_labels, target[tr_idx])
  np.testing.assert_array_equal(te_labels, target[te_idx])


def test_images_uint8_grey_rgb(splits):
  for images, _, _ in splits.values():
    assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
    np.testing.assert_array_equal(images[..., 0], images[..., 1])
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    assert images.max() == 255 and images.min() == 0


def test_pixels_and_labels_equal_sklearn(splits):
  from sklearn.datasets import load_digits

  bunch = load_digits()
  by_index = {}
  for images, labels, indices in splits.values():
    for img, lab, i in zip(images, labels, indices):
      by_index[int(i)] = (img, int(lab))
  for i in CHECKED_INDICES:
    img, lab = by_index[i]
    np.testing.assert_array_equal(img, _reference_image(bunch.images[i]), err_msg=f"index {i}")
    assert lab == int(bunch.target[i]), i
  # The smooth upscale keeps the 8x8 content: 4x4 block means track the scaled source closely.
  img = by_index[42][0][..., 0].astype(np.float64)
  blocks = img.reshape(8, 4, 8, 4).mean(axis=(1, 3))
  assert np.abs(blocks - bunch.images[42] * 255 / 16).mean() < 20


def test_check_dataset_prepares_it(tmp_path):
  d = str(tmp_path / "fresh")
  with _no_network():
    builder = data.check_dataset(DIGITS, split="train", data_dir=d)
  assert builder.is_prepared()
  assert os.path.isfile(os.path.join(d, DIGITS, "1.0.0", "dataset_info.json"))
  assert builder.info.splits["train"].num_examples == 1437
  with pytest.raises(ValueError, match="validation"):
    data.check_dataset(DIGITS, split="validation", data_dir=d)
