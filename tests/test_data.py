"""Tests for convmae_jax.data: the offline demo dataset and the deterministic, resumable pipeline."""

import contextlib
import math
import os
import socket
import time

import numpy as np
import pytest

from convmae_jax import data
from convmae_jax.data import demo_photos

DEMO = data.DEMO_DATASET
N_TRAIN = sum(p.split == "train" for p in demo_photos.PHOTOS)
N_TEST = sum(p.split == "test" for p in demo_photos.PHOTOS)


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
def demo_dir(tmp_path_factory):
  """Builds the demo dataset once (offline) into a fresh TFDS data_dir."""
  d = str(tmp_path_factory.mktemp("tfds"))
  t0 = time.perf_counter()
  with _no_network():
    builder = data.get_builder(DEMO, data_dir=d)
  build_s = time.perf_counter() - t0
  assert builder.is_prepared()
  assert build_s < 60, f"building the demo dataset took {build_s:.1f}s"
  return d


def _kw(demo_dir, **over):
  kw = dict(split="train", global_batch_size=6, image_size=32, seed=0, process_index=0,
            process_count=1, data_dir=demo_dir)
  kw.update(over)
  return kw


def _batches(it, k):
  return [next(it)["image"] for _ in range(k)]


def _identify(batch, reference):
  """Index of the reference image equal to each image of `batch` (exact, augment=False path)."""
  ids = []
  for x in batch:
    d = np.abs(reference - x[None]).reshape(len(reference), -1).max(axis=1)
    assert d.min() == 0.0, "image not found among the reference photos"
    ids.append(int(d.argmin()))
  return ids


# ------------------------------------------------------------------------------------ demo data


def test_demo_manifest_files_exist_and_licensed():
  assert N_TRAIN >= 16 and 4 <= N_TEST <= 6
  for p in demo_photos.PHOTOS:
    assert demo_photos.photo_path(p) is not None, p
    assert p.license and p.attribution and p.package in ("scikit-image", "scikit-learn", "matplotlib")
  assert len({p.key for p in demo_photos.PHOTOS}) == len(demo_photos.PHOTOS)


def test_demo_builder_splits_and_features(demo_dir):
  import tensorflow_datasets as tfds

  builder = tfds.builder(DEMO, data_dir=demo_dir)
  assert builder.info.splits["train"].num_examples == N_TRAIN >= 16
  assert builder.info.splits["test"].num_examples == N_TEST
  assert builder.info.features["label"].num_classes == 1
  assert len(builder.info.metadata["photos"]) == N_TRAIN + N_TEST
  names = {}
  for split in ("train", "test"):
    exs = list(tfds.as_numpy(builder.as_dataset(split=split)))
    names[split] = {ex["file_name"].decode() for ex in exs}
    for ex in exs:
      img = ex["image"]
      assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
      assert min(img.shape[:2]) == demo_photos.SHORT_SIDE
  assert len(names["train"]) == N_TRAIN and len(names["test"]) == N_TEST
  assert not names["train"] & names["test"]  # held out
  assert "skimage/data/chelsea.png" in names["test"]


def test_demo_build_is_cached(demo_dir):
  path = os.path.join(demo_dir, DEMO, "1.0.0", "dataset_info.json")
  mtime = os.path.getmtime(path)
  t0 = time.perf_counter()
  data.get_builder(DEMO, data_dir=demo_dir)
  assert time.perf_counter() - t0 < 2.0
  assert os.path.getmtime(path) == mtime


# ------------------------------------------------------------------------------------ pipeline


def test_batch_shapes_dtype_and_normalization(demo_dir):
  it = data.create_pretrain_dataset(DEMO, **_kw(demo_dir, global_batch_size=16, image_size=48))
  assert it.local_batch_size == 16 and it.num_examples == N_TRAIN
  x = np.concatenate(_batches(it, 4))
  assert x.shape == (64, 48, 48, 3) and x.dtype == np.float32
  assert np.isfinite(x).all()
  lo = (0.0 - data.IMAGENET_MEAN) / data.IMAGENET_STD
  hi = (1.0 - data.IMAGENET_MEAN) / data.IMAGENET_STD
  assert (x >= lo - 1e-5).all() and (x <= hi + 1e-5).all()
  # Inverse normalisation gives back uint8-valued pixels (PIL-like rounding before normalising).
  pix = data.denormalize(x) * 255.0
  np.testing.assert_allclose(pix, np.round(pix), atol=2e-3)
  mean, std = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))
  assert np.all(np.abs(mean) < 0.8), mean
  assert np.all((std > 0.5) & (std < 1.5)), std
  u8 = data.to_uint8(x)
  assert u8.dtype == np.uint8 and u8.shape == x.shape


def test_deterministic_and_resumable(demo_dir):
  # 6 does not divide 16: batches straddle epoch boundaries and resume offsets are mid-epoch.
  ref = _batches(data.create_pretrain_dataset(DEMO, **_kw(demo_dir)), 9)
  again = _batches(data.create_pretrain_dataset(DEMO, **_kw(demo_dir)), 9)
  for a, b in zip(ref, again):
    np.testing.assert_array_equal(a, b)
  for k in (1, 3, 8):  # 3 -> epoch 1 offset 2; 8 -> epoch 3 offset 0
    resumed = _batches(data.create_pretrain_dataset(DEMO, **_kw(demo_dir, start_step=k)), 9 - k)
    for j, b in enumerate(resumed):
      np.testing.assert_array_equal(b, ref[k + j], err_msg=f"start_step={k}, batch {j}")
  other = next(data.create_pretrain_dataset(DEMO, **_kw(demo_dir, seed=1)))["image"]
  assert not np.allclose(other, ref[0])
  # Batches differ from each other (augmentation and shuffling are not constant).
  assert not np.allclose(ref[0], ref[1])


def test_hflip_off_keeps_the_same_crops_unmirrored(demo_dir):
  """hflip=False (digits, text): every image is the hflip=True one or its mirror, the same crop,
  never mirrored; with the flip on about half of them are."""
  kw = _kw(demo_dir, global_batch_size=16, image_size=32)
  flipped = np.concatenate(_batches(data.create_pretrain_dataset(DEMO, **kw), 4))
  plain = np.concatenate(_batches(data.create_pretrain_dataset(DEMO, hflip=False, **kw), 4))
  same = np.array([np.array_equal(a, b) for a, b in zip(flipped, plain)])
  mirrored = np.array([np.array_equal(a[:, ::-1], b) for a, b in zip(flipped, plain)])
  assert np.all(same | mirrored)
  assert 16 <= mirrored.sum() <= 48 and 16 <= same.sum() <= 48, (same.sum(), mirrored.sum())


def test_resume_far_away_is_cheap(demo_dir):
  # Whole epochs are never re-read or decoded: resuming at step 10**7 costs about as much as
  # starting (at most one epoch of still-encoded examples is skipped).
  t0 = time.perf_counter()
  it = data.create_pretrain_dataset(DEMO, **_kw(demo_dir, start_step=10**7))
  x = next(it)["image"]
  assert time.perf_counter() - t0 < 10.0
  assert x.shape == (6, 32, 32, 3) and np.isfinite(x).all()


def test_two_processes_disjoint_and_resumable(demo_dir):
  reference = data.create_eval_batch(DEMO, split="train", num_images=N_TRAIN, image_size=32,
                                     data_dir=demo_dir)
  seen = []
  for p in (0, 1):
    kw = _kw(demo_dir, augment=False, global_batch_size=16, process_index=p, process_count=2)
    it = data.create_pretrain_dataset(DEMO, **kw)
    assert it.local_batch_size == 8 and it.num_examples == N_TRAIN // 2
    ids = _identify(next(it)["image"], reference)  # one full epoch of this process's slice
    assert len(set(ids)) == 8
    seen.append(set(ids))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(N_TRAIN))
  # Resume with augmentation on process 1 of 2 (local batch 3, mid-epoch offsets).
  kw = _kw(demo_dir, process_index=1, process_count=2)
  ref = _batches(data.create_pretrain_dataset(DEMO, **kw), 7)
  for k in (2, 5):
    resumed = _batches(data.create_pretrain_dataset(DEMO, **{**kw, "start_step": k}), 7 - k)
    for j, b in enumerate(resumed):
      np.testing.assert_array_equal(b, ref[k + j])
  p0 = next(data.create_pretrain_dataset(DEMO, **{**kw, "process_index": 0}))["image"]
  assert not np.allclose(p0, ref[0])


def test_each_epoch_is_a_new_permutation(demo_dir):
  reference = data.create_eval_batch(DEMO, split="train", num_images=N_TRAIN, image_size=32,
                                     data_dir=demo_dir)
  it = data.create_pretrain_dataset(DEMO, **_kw(demo_dir, augment=False,
                                                global_batch_size=N_TRAIN))
  orders = [_identify(b, reference) for b in _batches(it, 3)]
  for order in orders:
    assert sorted(order) == list(range(N_TRAIN))
  assert orders[0] != orders[1] and orders[1] != orders[2]


def test_random_resized_crop_boxes_follow_torchvision():
  import tensorflow as tf

  from convmae_jax.data import pipeline

  def boxes(h, w, n=400):
    seeds = tf.stack([tf.range(n, dtype=tf.int64), tf.fill([n], tf.constant(7, tf.int64))], 1)
    fn = lambda s: tf.stack(pipeline._random_resized_crop_box(
        tf.constant(h), tf.constant(w), s, (0.2, 1.0), (3 / 4, 4 / 3)))
    return tf.map_fn(fn, seeds, fn_output_signature=tf.int32).numpy()

  b = boxes(300, 400)
  y, x, h, w = b.T
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= 300).all() and (x + w <= 400).all()
  area = h * w / (300 * 400)
  assert area.min() > 0.19 and area.max() <= 1.0 and np.median(area) > 0.45
  ratio = w / h
  assert ratio.min() > 0.74 and ratio.max() < 1.35
  assert len({tuple(r) for r in b}) > 350  # random
  # Very elongated image: no try fits -> central crop with the ratio clamped to 4/3.
  y, x, h, w = boxes(20, 600, n=8).T
  assert (h == 20).all() and (w == round(20 * 4 / 3)).all() and (x == (600 - w) // 2).all()


def test_eval_batch(demo_dir):
  e = data.create_eval_batch(DEMO, split="test", num_images=N_TEST, image_size=64,
                             data_dir=demo_dir)
  assert e.shape == (N_TEST, 64, 64, 3) and e.dtype == np.float32
  e2 = data.create_eval_batch(DEMO, split="test", num_images=2, image_size=64, data_dir=demo_dir)
  np.testing.assert_array_equal(e[:2], e2)
  with pytest.raises(ValueError, match="num_images=99"):
    data.create_eval_batch(DEMO, split="test", num_images=99, image_size=64, data_dir=demo_dir)


def test_mock_imagenet2012():
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=10):
    kw = dict(split="train", global_batch_size=4, image_size=32, seed=0, process_index=0,
              process_count=1)
    ref = _batches(data.create_pretrain_dataset("imagenet2012", **kw), 5)
    assert ref[0].shape == (4, 32, 32, 3) and ref[0].dtype == np.float32
    resumed = _batches(data.create_pretrain_dataset("imagenet2012", start_step=3, **kw), 2)
    np.testing.assert_array_equal(resumed[0], ref[3])
    np.testing.assert_array_equal(resumed[1], ref[4])
    assert data.num_examples("imagenet2012", split="train") == 10
    it = data.create_pretrain_dataset("imagenet2012:5.1.0", **{**kw, "process_index": 1,
                                                               "process_count": 2})
    assert next(it)["image"].shape == (2, 32, 32, 3)
    e = data.create_eval_batch("imagenet2012", split="validation", num_images=3, image_size=32)
    assert e.shape == (3, 32, 32, 3)


def test_mock_png_dataset():
  """Non-JPEG images (cifar10 stores PNG) go through the full-decode branch."""
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=8):
    it = data.create_pretrain_dataset("cifar10", split="train", global_batch_size=4,
                                      image_size=16, seed=0, process_index=0, process_count=1)
    x = next(it)["image"]
  assert x.shape == (4, 16, 16, 3) and np.isfinite(x).all()


def test_tf_kept_off_gpus(demo_dir):
  import tensorflow as tf

  data.create_eval_batch(DEMO, split="test", num_images=1, image_size=16, data_dir=demo_dir)
  assert tf.config.get_visible_devices("GPU") == []


# ---------------------------------------------------------------------------------- errors


def test_missing_dataset_message_names_data_dir(tmp_path):
  empty = str(tmp_path / "no_data_here")
  t0 = time.perf_counter()
  with pytest.raises(data.DatasetNotPreparedError) as err:
    data.create_pretrain_dataset("imagenet2012", split="train", global_batch_size=8,
                                 image_size=32, seed=0, process_index=0, process_count=1,
                                 data_dir=empty)
  assert time.perf_counter() - t0 < 2.0
  msg = str(err.value)
  assert os.path.join(empty, "imagenet2012") in msg
  for needle in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "--manual_dir",
                 "python -m convmae_jax.data prepare imagenet2012", "TFDS_DATA_DIR", DEMO):
    assert needle in msg, needle
  assert isinstance(err.value, FileNotFoundError)
  with pytest.raises(data.DatasetNotPreparedError, match="convmae_jax.data prepare mnist"):
    data.check_dataset("mnist", data_dir=empty)


def test_unknown_dataset_and_split(demo_dir):
  with pytest.raises(ValueError, match="Unknown dataset 'no_such_dataset_xyz'.*imagenet2012"):
    data.check_dataset("no_such_dataset_xyz", data_dir=demo_dir)
  with pytest.raises(ValueError, match="split='validation'.*'test', 'train'"):
    data.check_dataset(DEMO, split="validation", data_dir=demo_dir)
  with pytest.raises(ValueError, match="dataset_name"):
    data.check_dataset("", data_dir=demo_dir)


@pytest.mark.parametrize("over, pattern", [
    (dict(image_size=0), r"image_size=0 .*> 0"),
    (dict(image_size=32.5), r"image_size=32.5 .*integer"),
    (dict(global_batch_size=5, process_count=2), r"global_batch_size=5 .*divisible by process_count=2"),
    (dict(global_batch_size=0), r"global_batch_size=0"),
    (dict(process_index=2, process_count=2), r"process_index=2 .*\[0, process_count=2\)"),
    (dict(process_count=0), r"process_count=0 .*>= 1"),
    (dict(start_step=-1), r"start_step=-1 .*>= 0"),
    (dict(scale=(0.5, 0.2)), r"scale=\(0.5, 0.2\) .*0 < lo <= hi <= 1"),
    (dict(shuffle_buffer=0), r"shuffle_buffer=0"),
])
def test_bad_arguments_raise(demo_dir, over, pattern):
  with pytest.raises(ValueError, match=pattern):
    data.create_pretrain_dataset(DEMO, **_kw(demo_dir, **over))


def test_denormalize_inverts_normalization():
  rng = np.random.default_rng(0)
  pix = rng.integers(0, 256, size=(2, 4, 4, 3)).astype(np.float32)
  x = (pix / 255.0 - data.IMAGENET_MEAN) / data.IMAGENET_STD
  np.testing.assert_allclose(data.denormalize(x) * 255.0, pix, atol=1e-3)
  np.testing.assert_array_equal(data.to_uint8(x), pix.astype(np.uint8))
  assert math.isclose(float(data.IMAGENET_STD[0]), 0.229, rel_tol=1e-6)


# ---------------------------------------------------------------- ImageNet from its tars


def _jpeg(seed: int) -> bytes:
  import io
  from PIL import Image
  pixels = (np.random.default_rng(seed).random((40, 50, 3)) * 255).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="JPEG")
  return out.getvalue()


def _tar_add(tar, name: str, payload: bytes) -> None:
  import io
  import tarfile
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def test_prepare_builds_imagenet_from_the_official_tar_layout(tmp_path, capsys):
  """A miniature ImageNet in image-net.org's layout (a train tar of per-synset tars, a flat val
  tar) through ``python -m convmae_jax.data prepare`` and then the training pipeline."""
  import io
  import tarfile
  from convmae_jax.data import __main__ as data_cli

  manual = tmp_path / "manual"
  manual.mkdir()
  # A refused call names what is missing and writes nothing.
  assert data_cli.main(["prepare", "imagenet2012", "--data_dir", str(tmp_path / "tfds"),
                        "--manual_dir", str(manual)]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: --manual_dir {manual} lacks ILSVRC2012_img_train.tar, "
                        "ILSVRC2012_img_val.tar"), err
  assert not (tmp_path / "tfds").exists()

  synsets = ("n01440764", "n01443537")        # the first two of ImageNet's 1000 classes
  with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as outer:
    for k, synset in enumerate(synsets):
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
        for i in range(3):
          _tar_add(inner, f"{synset}_{i}.JPEG", _jpeg(10 * k + i))
      _tar_add(outer, f"{synset}.tar", inner_bytes.getvalue())
  with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:
    for i in range(1, 5):
      _tar_add(val, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(100 + i))

  with _no_network():
    assert data_cli.main(["prepare", "imagenet2012", "--data_dir", str(tmp_path / "tfds"),
                          "--manual_dir", str(manual)]) == 0
  out = capsys.readouterr().out
  assert "imagenet2012 5.1.0 prepared in" in out and "train 6, validation 4 examples" in out
  assert data.num_examples("imagenet2012", split="train", data_dir=str(tmp_path / "tfds")) == 6
  import tensorflow_datasets as tfds
  labels = sorted(int(ex["label"]) for ex in tfds.load(
      "imagenet2012", split="train", data_dir=str(tmp_path / "tfds")).as_numpy_iterator())
  assert labels == [0, 0, 0, 1, 1, 1]                  # the synset order of ImageNet's classes
  batch = next(data.create_pretrain_dataset("imagenet2012", split="validation",
                                            global_batch_size=4, image_size=32, seed=0,
                                            process_index=0, process_count=1,
                                            data_dir=str(tmp_path / "tfds")))
  assert batch["image"].shape == (4, 32, 32, 3) and not np.any(batch["bad"])
