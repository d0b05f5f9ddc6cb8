"""TFDS input pipeline for ConvMAE pretraining: deterministic, resumable, one disjoint slice per process.

Order of operations (per process):

1. ``builder.as_dataset(split=<this process's even slice>, shuffle_files=False)`` with the image left
   encoded (``tfds.decode.SkipDecoding``): a fixed, deterministic order of ``n`` examples.
2. Epoch ``e`` is that order passed through a shuffle buffer seeded with ``(seed, process_index, e)``;
   the epochs are chained (``Dataset.range(e0, ...).flat_map``) and each example gets its global
   position ``g = e * n + i``.
3. Resume: with ``start_step=k`` the stream starts at epoch ``e0 = k*B // n`` and skips the
   ``k*B % n`` first (still encoded) examples of that epoch, so no image is decoded or augmented
   for nothing and whole epochs are never re-read.
4. Each example is decoded and augmented with stateless random ops keyed on
   ``(seed, process_index, g)``: RandomResizedCrop (torchvision's algorithm: 10 tries of a
   log-uniform aspect ratio, then the central fallback; bicubic, antialiased, uint8-rounded),
   horizontal flip with probability 1/2, ImageNet mean/std normalisation.
   An example whose decoding fails (a truncated JPEG, bytes that are no image) is replaced by the
   mean-colour image and flagged ``bad`` with its TFDS id and the decoder's message; it keeps its
   place, so positions (and resuming) do not move.
5. ``batch(B, drop_remainder=True)``, prefetch, numpy.

The batches therefore depend only on ``(dataset, split, seed, process_index, process_count,
global_batch_size, image_size, augment, scale, ratio, shuffle_buffer)``: the sequence produced with
``start_step=k`` equals the one produced with ``start_step=0`` after its first ``k`` batches.
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
import os
from typing import Any, Sequence

import numpy as np

from convmae_jax.data import demo_digits, demo_photos, demo_segments

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

DEMO_DATASET = demo_photos.NAME
# Datasets built offline from files pip packages ship; get_builder prepares them when missing.
EMBEDDED_DATASETS = (demo_photos.NAME, demo_digits.NAME, demo_segments.NAME)
DEFAULT_SHUFFLE_BUFFER = 10_000
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_MAX_EPOCHS = 2**40  # "infinite"
_RRC_TRIES = 10


class DatasetNotPreparedError(FileNotFoundError):
  """The TFDS dataset exists in the catalogue but has not been downloaded/prepared in data_dir."""


# --------------------------------------------------------------------------------------- helpers


def denormalize(images):
  """Inverse of the ImageNet normalisation: ``images * std + mean`` (values ~[0, 1], not clipped).

  Works on numpy and jax arrays of shape (..., 3).
  """
  return images * IMAGENET_STD + IMAGENET_MEAN


def to_uint8(images) -> np.ndarray:
  """Normalized images (..., 3) -> uint8 [0, 255] numpy (denormalized, clipped, rounded)."""
  x = np.asarray(denormalize(np.asarray(images, dtype=np.float32))) * 255.0
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


_TF = None


def _tf():
  """Imports TensorFlow once, keeping it off every GPU/TPU (JAX owns the accelerators)."""
  global _TF
  if _TF is None:
    import tensorflow as tf

    for kind in ("GPU", "TPU"):
      try:
        tf.config.set_visible_devices([], kind)
      except (RuntimeError, ValueError):  # already initialised, or no such device type
        pass
    _TF = tf
  return _TF


def _int_arg(name: str, value: Any, *, minimum: int | None = None, accepted: str = "") -> int:
  if isinstance(value, bool):
    raise ValueError(f"{name}={value!r} is not valid: expected an integer {accepted}".rstrip())
  try:
    v = operator.index(value)
  except TypeError:
    raise ValueError(
        f"{name}={value!r} is not valid: expected an integer {accepted}".rstrip()) from None
  if minimum is not None and v < minimum:
    raise ValueError(f"{name}={value!r} is not valid: expected an integer {accepted}".rstrip())
  return v


def _range_arg(name: str, value: Any, lo: float, hi: float, accepted: str) -> tuple[float, float]:
  try:
    a, b = (float(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} is not valid: expected {accepted}") from None
  if not (lo < a <= b <= hi) or not (math.isfinite(a) and math.isfinite(b)):
    raise ValueError(f"{name}={value!r} is not valid: expected {accepted}")
  return a, b


def _process_args(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  process_count = _int_arg("process_count", process_count, minimum=1, accepted=">= 1")
  process_index = _int_arg("process_index", process_index, minimum=0,
                           accepted=f"in [0, process_count={process_count})")
  if process_index >= process_count:
    raise ValueError(f"process_index={process_index} is not valid: expected an integer in "
                     f"[0, process_count={process_count})")
  return process_index, process_count


# ------------------------------------------------------------------------------------ datasets


def _tfds_is_mocked() -> bool:
  """True inside `tfds.testing.mock_data(...)` (as_dataset is patched; nothing is on disk)."""
  import tensorflow_datasets as tfds

  fn = tfds.core.DatasetBuilder.as_dataset
  return "testing.mocking" in (getattr(fn, "__module__", "") or "")


def _base_name(dataset_name: str) -> str:
  return dataset_name.split(":")[0].split("/")[0].strip()


def _not_prepared_message(dataset_name: str, builder) -> str:
  root = str(builder.data_dir_root)
  where = (f"Dataset {dataset_name!r} (version {builder.version}) is not prepared: TFDS looked in "
           f"{builder.data_dir} (data_dir={root}; choose it with --config.data_dir=... / the "
           "data_dir argument, or the TFDS_DATA_DIR environment variable; default "
           "~/tensorflow_datasets).")
  if _base_name(dataset_name).startswith("imagenet2012"):
    manual = os.path.join(root, "downloads", "manual")
    how = (
        "\nTo prepare ImageNet (ILSVRC2012) for TFDS:\n"
        "  1. Download ILSVRC2012_img_train.tar (~138 GB) and ILSVRC2012_img_val.tar (~6.3 GB) "
        "from https://image-net.org/ (free account, terms of access) into a manual dir, e.g. "
        f"{manual}/ (do not extract them).\n"
        f"  2. Run:  python -m convmae_jax.data prepare imagenet2012 --data_dir={root} "
        f"--manual_dir={manual}\n"
        "  This takes a few hours on one machine and writes ~150 GB of TFRecords. On TPU "
        "VMs/pods, prepare once into a bucket (data_dir=gs://<bucket>/tensorflow_datasets) and "
        "point every host at it.\n"
        f"  No ImageNet? Use dataset={DEMO_DATASET!r} (built offline from photos that pip "
        "packages ship).")
  else:
    how = (f"\nPrepare it first:  python -m convmae_jax.data prepare {dataset_name} "
           f"--data_dir={root}")
    instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if instructions:
      how += f"\nManual download instructions:\n{instructions}"
  return where + how


def get_builder(dataset_name: str, *, data_dir: str | None = None):
  """Returns a TFDS builder whose data exists, preparing an embedded demo dataset if needed.

  Cheap: no TensorFlow graph is built and no example is read. Raises ValueError for an unknown
  dataset name and `DatasetNotPreparedError` (a FileNotFoundError) when the data is not in
  `data_dir`, with the directory TFDS looked in and how to prepare it.
  """
  import tensorflow_datasets as tfds

  if not isinstance(dataset_name, str) or not dataset_name.strip():
    raise ValueError(f"dataset_name={dataset_name!r} is not valid: expected a TFDS dataset name "
                     f"such as 'imagenet2012', 'imagenet2012:5.1.0' or {DEMO_DATASET!r}")
  dataset_name = dataset_name.strip()
  try:
    builder = tfds.builder(dataset_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"Unknown dataset {dataset_name!r}: it is not a TFDS dataset name. Accepted: "
        f"'imagenet2012' (or 'imagenet2012:<version>'), {DEMO_DATASET!r}, or any name listed by "
        f"tensorflow_datasets.list_builders(). ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''})") from None
  if _tfds_is_mocked():
    return builder
  if builder.is_prepared():
    return builder
  if _base_name(dataset_name) in EMBEDDED_DATASETS:
    _prepare_demo(builder)
    # A fresh builder reads the prepared dataset_info (splits), also when another process won
    # the race to prepare it.
    return tfds.builder(dataset_name, data_dir=data_dir)
  raise DatasetNotPreparedError(_not_prepared_message(dataset_name, builder))


def _prepare_demo(builder) -> None:
  """Prepares an embedded offline dataset (seconds); tolerates concurrent preparation."""
  import logging

  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.utils import tqdm_utils

  logging.getLogger(__name__).info("preparing %s in %s (offline, from files pip packages ship)",
                                   builder.name, builder.data_dir)
  was_active = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(False)
  try:
    # TFDS prints "Downloading and preparing dataset Unknown size ..." for a local build: quiet.
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP))
  except Exception:
    if not builder.is_prepared():  # not just another process finishing first
      raise
  finally:
    tfds.display_progress_bar(was_active)


def _check_split(builder, dataset_name: str, split: str) -> None:
  if not isinstance(split, str) or not split.strip():
    raise ValueError(f"split={split!r} is not valid: expected a TFDS split string such as "
                     "'train', 'validation' or 'train[:10%]'")
  if _tfds_is_mocked():
    return
  try:
    n = builder.info.splits[split].num_examples
  except (KeyError, ValueError, AssertionError, TypeError) as e:
    raise ValueError(f"split={split!r} is not valid for dataset {dataset_name!r}: available "
                     f"splits are {sorted(builder.info.splits.keys())} (sub-splits like "
                     f"'train[:10%]' are accepted). ({e})") from None
  if n <= 0:
    raise ValueError(f"split={split!r} of dataset {dataset_name!r} has no examples")


def _image_key(builder, dataset_name: str) -> str:
  import tensorflow_datasets as tfds

  feats = builder.info.features
  if "image" in feats and isinstance(feats["image"], tfds.features.Image):
    return "image"
  raise ValueError(f"dataset {dataset_name!r} has no 'image' feature of type tfds.features.Image "
                   f"(features: {list(feats.keys())}); only image datasets are accepted")


def check_dataset(dataset_name: str, *, split: str = "train", data_dir: str | None = None):
  """Validates name, presence on disk (preparing the demo dataset) and split; returns the builder.

  Meant to be called by the trainer before any compute.
  """
  builder = get_builder(dataset_name, data_dir=data_dir)
  _check_split(builder, dataset_name, split)
  _image_key(builder, dataset_name)
  return builder


def _read_encoded(builder, split, image_key: str, label_key: str | None = None,
                  with_id: bool = False):
  """Deterministic-order dataset of encoded image bytes for `split` (no decoding); with
  `label_key`, of (image bytes, int32 label) pairs. ``with_id``: each element also ends with the
  record's TFDS id (``"<dataset>-<split>.<format>-<shard>-of-<shards>__<record>"``), its identity in
  messages about it."""
  import tensorflow_datasets as tfds

  tf = _tf()
  ds = builder.as_dataset(
      split=split, shuffle_files=False,
      decoders={image_key: tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(add_tfds_id=with_id))
  if label_key is None and not with_id:
    pick = lambda ex: ex[image_key]
  elif not with_id:
    pick = lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32))
  elif label_key is None:
    pick = lambda ex: (ex[image_key], ex["tfds_id"])
  else:
    pick = lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32), ex["tfds_id"])
  ds = ds.map(pick, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  opts = tf.data.Options()
  opts.deterministic = True
  return ds.with_options(opts)


def _cardinality(ds) -> int:
  tf = _tf()
  n = int(ds.cardinality().numpy())
  if n >= 0:
    return n
  if n == tf.data.INFINITE_CARDINALITY:
    raise ValueError("the dataset split is infinite; expected a finite TFDS split")
  return int(ds.reduce(np.int64(0), lambda c, _: c + 1).numpy())  # unknown: count encoded records


def num_examples(dataset_name: str, *, split: str = "train", data_dir: str | None = None) -> int:
  """Number of examples of `split` (e.g. for steps per epoch); works under tfds mock_data."""
  builder = check_dataset(dataset_name, split=split, data_dir=data_dir)
  if _tfds_is_mocked():
    return _cardinality(_read_encoded(builder, split, _image_key(builder, dataset_name)))
  return int(builder.info.splits[split].num_examples)


# ----------------------------------------------------------------------------- image transforms


def _decode_and_crop(image_bytes, box_fn):
  """Decodes `image_bytes` to RGB uint8, cropping to box_fn(height, width) -> (y, x, h, w).

  JPEGs are decoded only inside the crop window (decode_and_crop_jpeg); other formats are fully
  decoded then cropped.
  """
  tf = _tf()

  def jpeg():
    shape = tf.image.extract_jpeg_shape(image_bytes)
    y, x, h, w = box_fn(shape[0], shape[1])
    return tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([y, x, h, w]), channels=3)

  def other():
    img = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
    img = tf.ensure_shape(img, [None, None, 3])
    shape = tf.shape(img)
    y, x, h, w = box_fn(shape[0], shape[1])
    return img[y:y + h, x:x + w, :]

  is_jpeg = tf.equal(tf.strings.substr(image_bytes, 0, 3), b"\xff\xd8\xff")
  out = tf.cond(is_jpeg, jpeg, other)
  return tf.ensure_shape(out, [None, None, 3])


def _random_resized_crop_box(height, width, seed, scale, ratio):
  """torchvision.transforms.RandomResizedCrop.get_params with stateless random numbers."""
  tf = _tf()
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  area = h * w
  s_area, s_off = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  u = tf.random.stateless_uniform([_RRC_TRIES, 2], seed=s_area, dtype=tf.float32)
  target_area = area * (scale[0] + u[:, 0] * (scale[1] - scale[0]))
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + u[:, 1] * (log_hi - log_lo))
  cw = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  ch = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  ok = (cw > 0) & (ch > 0) & (cw <= width) & (ch <= height)
  v = tf.random.stateless_uniform([_RRC_TRIES, 2], seed=s_off, dtype=tf.float32)
  ys = tf.minimum(tf.cast(tf.floor(v[:, 0] * tf.cast(height - ch + 1, tf.float32)), tf.int32),
                  height - ch)
  xs = tf.minimum(tf.cast(tf.floor(v[:, 1] * tf.cast(width - cw + 1, tf.float32)), tf.int32),
                  width - cw)
  first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)

  # Fallback (no try fitted): central crop with the aspect ratio clamped into `ratio`.
  in_ratio = w / h
  fw = tf.where(in_ratio < ratio[0], width,
                tf.where(in_ratio > ratio[1], tf.cast(tf.round(h * ratio[1]), tf.int32), width))
  fh = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w / ratio[0]), tf.int32),
                tf.where(in_ratio > ratio[1], height, height))
  fw = tf.clip_by_value(fw, 1, width)
  fh = tf.clip_by_value(fh, 1, height)
  any_ok = tf.reduce_any(ok)
  box_h = tf.where(any_ok, ch[first], fh)
  box_w = tf.where(any_ok, cw[first], fw)
  box_y = tf.where(any_ok, ys[first], (height - fh) // 2)
  box_x = tf.where(any_ok, xs[first], (width - fw) // 2)
  return box_y, box_x, box_h, box_w


def _center_square_box(height, width):
  tf = _tf()
  side = tf.minimum(height, width)
  return (height - side) // 2, (width - side) // 2, side, side


def _resize_normalize(crop, image_size: int):
  """uint8 crop -> bicubic antialiased resize -> uint8 rounding (like PIL) -> mean/std normalize."""
  tf = _tf()
  x = tf.image.resize(crop, [image_size, image_size], method="bicubic", antialias=True)
  x = tf.round(tf.clip_by_value(x, 0.0, 255.0))
  x = (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
  return tf.ensure_shape(tf.cast(x, tf.float32), [image_size, image_size, 3])


def _example_seed(key, index):
  tf = _tf()
  return tf.random.experimental.stateless_fold_in(key, index)


def _seed_pair(*words: int) -> np.ndarray:
  """Two int64 words (TF stateless seed) derived from integers with numpy's SeedSequence."""
  state = np.random.SeedSequence([int(w) % (2**63) for w in words]).generate_state(2, np.uint32)
  return state.astype(np.int64)


# ------------------------------------------------------------------------------ bad records

# Features every training batch carries besides the images: per example, whether its record could
# not be decoded (and was replaced), its TFDS id and, for a bad one, the decoder's message.
BAD_KEY = "bad"
ID_KEY = "example_id"
REASON_KEY = "bad_reason"
HOST_KEYS = (ID_KEY, REASON_KEY)   # strings: they stay on the host


def failure_reason(image_bytes: bytes) -> str:
  """Why ``image_bytes`` cannot be decoded: TensorFlow's decoder run again on the host (eagerly,
  outside tf.data), ``"<error class>: <first line of its message>"``. When the whole image does
  decode, it was the crop of this example that failed (a JPEG cut short below the crop's rows)."""
  tf = _tf()
  try:
    tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  except tf.errors.OpError as e:
    message = (e.message or "").strip().splitlines()
    text = message[0] if message else ""
    if "}} " in text:                      # "{{function_node ...}} jpeg::Uncompress failed. ..."
      text = text.split("}} ", 1)[1]
    return f"{type(e).__name__}: {text.split(' [Op:')[0][:200]}"
  return "the image decodes whole but not in this example's crop window (a truncated JPEG?)"


def describe_bad(batch: dict) -> dict:
  """Replaces the raw bytes :func:`decode_guarded` carries for each bad example (``bad_reason``
  holds them in the tf.data stream) by the decoder's message; done on the host, once per bad
  example, so the stream needs no Python callback."""
  if BAD_KEY in batch and np.any(batch[BAD_KEY]):
    reasons = np.array(batch[REASON_KEY], dtype=object)
    for i in np.flatnonzero(batch[BAD_KEY]):
      reasons[i] = failure_reason(reasons[i]).encode()
    batch = dict(batch, **{REASON_KEY: reasons})
  return batch


def replacement_image(image_size: int):
  """The image that replaces an undecodable one: every pixel the ImageNet mean colour (all zeros
  after normalisation)."""
  return _tf().zeros([image_size, image_size, 3], _tf().float32)


def decode_guarded(stream, transform, replacement):
  """``stream`` of ``(*args, tfds_id)`` -> ``transform(*args)`` (a dict), where an example whose
  transform fails (a truncated JPEG, bytes that are no image) gets ``replacement(*args)`` (the same
  structure; e.g. :func:`replacement_image` and the example's label) instead.

  Nothing is dropped and the order is kept (each example is a one-element dataset: the transform
  with its errors ignored, then the replacement, the first one taken; a deterministic interleave
  runs them in parallel), so the batch keeps its size and every later example its position: a
  resumed run sees the same batches. Each element also carries ``bad`` (bool), ``example_id`` (the
  TFDS id) and ``bad_reason`` (for a bad example its encoded bytes, else ""; :func:`describe_bad`
  turns them into the decoder's message on the host).
  """
  tf = _tf()

  def good(*elem):
    out = dict(transform(*elem[:-1]))
    out.update({BAD_KEY: tf.constant(False), ID_KEY: elem[-1], REASON_KEY: tf.constant("")})
    return out

  def replaced(*elem):
    out = dict(replacement(*elem[:-1]))
    # The record's bytes go along (bad examples only); describe_bad turns them into the reason.
    image_bytes = next(a for a in elem[:-1] if a.dtype == tf.string)
    out.update({BAD_KEY: tf.constant(True), ID_KEY: elem[-1], REASON_KEY: image_bytes})
    return out

  def one(*elem):
    single = tf.data.Dataset.from_tensors(elem)
    return single.map(good).ignore_errors().concatenate(single.map(replaced)).take(1)

  return stream.interleave(one, cycle_length=tf.data.AUTOTUNE, block_length=1,
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# ---------------------------------------------------------------------------------- public API


def batch_args(global_batch_size, process_count: int) -> int:
  """Checks the global batch and returns this process's share of it."""
  global_batch_size = _int_arg("global_batch_size", global_batch_size, minimum=1,
                               accepted=f"> 0 and divisible by process_count={process_count}")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not valid: it must be divisible "
                     f"by process_count={process_count}")
  return global_batch_size // process_count


def finish(ds, local_batch: int, prefetch: int, threads: int | None):
  """Batches (dropping the remainder), prefetches and makes a stream deterministic."""
  tf = _tf()
  ds = ds.batch(local_batch, drop_remainder=True)
  if prefetch:
    ds = ds.prefetch(prefetch)
  opts = tf.data.Options()
  opts.deterministic = True
  if threads is not None:
    opts.threading.private_threadpool_size = threads
  return ds.with_options(opts)


def augment_seed(seed: int, process_index: int):
  """The per-process TF stateless key that per-example augmentation keys are folded from."""
  tf = _tf()
  return tf.constant(_seed_pair(seed, process_index, 0xA06), tf.int64)


def example_stream(builder, dataset_name: str, split: str, *, image_key: str, label_key: str | None,
                   seed: int, process_index: int, process_count: int, local_batch: int,
                   start_step: int, shuffle_buffer: int):
  """This process's infinite, shuffled, resumable stream of ``(position, image bytes[, label],
  TFDS id)``.

  Steps 1-3 of the module docstring: the process's even slice in a fixed order, one shuffle per
  epoch seeded by ``(seed, process_index, epoch)``, started at example ``start_step * local_batch``
  without decoding what is skipped. Returns ``(dataset, examples in the slice)``.
  """
  import tensorflow_datasets as tfds

  tf = _tf()
  proc_split = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
  encoded = _read_encoded(builder, proc_split, image_key, label_key, with_id=True)
  n = _cardinality(encoded)
  if n == 0:
    raise ValueError(f"process {process_index}/{process_count} got no examples of "
                     f"{dataset_name!r} split {split!r}; use fewer processes or a larger split")

  shuffle_key = tf.constant(_seed_pair(seed, process_index, 0x5EED), tf.int64)
  buffer = min(shuffle_buffer, n)

  def epoch(e):
    ds = encoded
    if buffer > 1:
      s = tf.random.stateless_uniform([], seed=tf.stack([shuffle_key[0] + e, shuffle_key[1]]),
                                      minval=1, maxval=2**31 - 1, dtype=tf.int64)
      ds = ds.shuffle(buffer, seed=s, reshuffle_each_iteration=False)
    positions = tf.data.Dataset.range(e * n, (e + 1) * n)
    return tf.data.Dataset.zip(positions, ds).map(lambda i, ex: (i, *ex))

  first_epoch, offset = divmod(start_step * local_batch, n)
  stream = tf.data.Dataset.range(first_epoch, _MAX_EPOCHS).flat_map(epoch)
  if offset:
    stream = stream.skip(offset)  # skipped before decoding: cheap
  return stream, n


class PretrainIterator:
  """Iterator over numpy batches ``{"image": float32 (local_batch, S, S, 3), "bad": bool
  (local_batch,), "example_id": bytes (local_batch,), "bad_reason": bytes (local_batch,)}``
  (infinite; see :func:`decode_guarded` for the last three).

  Attributes: ``local_batch_size``, ``num_examples`` (examples in this process's slice),
  ``process_index``, ``process_count``, ``start_step``, ``dataset`` (the underlying tf.data).
  """

  def __init__(self, dataset, *, local_batch_size, num_examples, process_index, process_count,
               start_step):
    self.dataset = dataset
    self.local_batch_size = local_batch_size
    self.num_examples = num_examples
    self.process_index = process_index
    self.process_count = process_count
    self.start_step = start_step
    self._it = None

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = self.dataset.as_numpy_iterator()
    return describe_bad(next(self._it))


def create_pretrain_dataset(
    dataset_name: str,
    *,
    split: str,
    global_batch_size: int,
    image_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    data_dir: str | None = None,
    start_step: int = 0,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    augment: bool = True,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = DEFAULT_RATIO,
    prefetch: int = 2,
    threads: int | None = None,
    hflip: bool = True,
) -> PretrainIterator:
  """Infinite iterator of this process's pretraining batches (numpy).

  Each element is ``{"image": float32 (global_batch_size // process_count, image_size,
  image_size, 3)}``, ImageNet mean/std normalized, with ``bad``, ``example_id`` and ``bad_reason``
  per example: a record that cannot be decoded is replaced by the mean-colour image and flagged
  (:func:`decode_guarded`), never dropped. Process ``process_index`` of ``process_count``
  (default: jax.process_index()/jax.process_count()) reads its own disjoint even slice of
  ``split``. Deterministic given (seed, process_index, process_count) and resumable:
  ``start_step=k`` yields exactly the batches ``k, k+1, ...`` of the ``start_step=0`` sequence.

  ``augment=True``: RandomResizedCrop(image_size, scale, ratio, bicubic) + horizontal flip (p=1/2;
  ``hflip=False`` for images that a mirror changes, such as digits: the crops stay the same);
  ``augment=False``: central square crop resized to image_size (shuffling unchanged).
  ``shuffle_buffer``: examples (still JPEG-encoded, ~110 KB each for ImageNet) in the per-epoch
  shuffle buffer. ``threads``: size of a private tf.data thread pool (None: tf.data's default,
  all cores; set it low on small CPUs where JAX needs the cores). The number of threads never
  changes the batches.

  Raises ValueError for invalid arguments / unknown dataset or split, and
  `DatasetNotPreparedError` (FileNotFoundError) when the dataset is not in ``data_dir``.
  The demo dataset ``convmae_demo_photos`` is prepared automatically on first use.
  """
  process_index, process_count = _process_args(process_index, process_count)
  image_size = _int_arg("image_size", image_size, minimum=1, accepted="> 0 (pixels)")
  local_batch = batch_args(global_batch_size, process_count)
  seed = _int_arg("seed", seed, accepted="(any integer)")
  start_step = _int_arg("start_step", start_step, minimum=0, accepted=">= 0")
  shuffle_buffer = _int_arg("shuffle_buffer", shuffle_buffer, minimum=1,
                            accepted=">= 1 (1 = no shuffling)")
  prefetch = _int_arg("prefetch", prefetch, minimum=0, accepted=">= 0")
  if threads is not None:
    threads = _int_arg("threads", threads, minimum=1, accepted=">= 1 or None")
  scale = _range_arg("scale", scale, 0.0, 1.0, "(lo, hi) with 0 < lo <= hi <= 1")
  ratio = _range_arg("ratio", ratio, 0.0, math.inf, "(lo, hi) with 0 < lo <= hi")

  builder = check_dataset(dataset_name, split=split, data_dir=data_dir)
  image_key = _image_key(builder, dataset_name)
  tf = _tf()
  stream, n = example_stream(builder, dataset_name, split, image_key=image_key, label_key=None,
                             seed=seed, process_index=process_index, process_count=process_count,
                             local_batch=local_batch, start_step=start_step,
                             shuffle_buffer=shuffle_buffer)
  augment_key = augment_seed(seed, process_index)

  def transform(index, image_bytes):
    key = _example_seed(augment_key, index)
    if augment:
      k_crop, k_flip = tf.unstack(tf.random.experimental.stateless_split(key, 2))
      crop = _decode_and_crop(image_bytes, lambda h, w: _random_resized_crop_box(
          h, w, k_crop, scale, ratio))
      img = _resize_normalize(crop, image_size)
      if hflip:
        flip = tf.random.stateless_uniform([], seed=k_flip) < 0.5
        img = tf.cond(flip, lambda: tf.reverse(img, axis=[1]), lambda: img)
    else:
      img = _resize_normalize(_decode_and_crop(image_bytes, _center_square_box), image_size)
    return {"image": img}

  ds = finish(decode_guarded(stream, transform, lambda index, image_bytes: {
      "image": replacement_image(image_size)}), local_batch, prefetch, threads)
  return PretrainIterator(ds, local_batch_size=local_batch, num_examples=n,
                          process_index=process_index, process_count=process_count,
                          start_step=start_step)


def create_eval_batch(
    dataset_name: str,
    *,
    split: str,
    num_images: int,
    image_size: int,
    data_dir: str | None = None,
) -> np.ndarray:
  """The first `num_images` examples of `split` (fixed order): central square crop resized to
  `image_size` (bicubic), ImageNet-normalized; float32 numpy (num_images, S, S, 3).

  For the demo dataset use split="test" (5 held-out photos); for ImageNet "validation".
  """
  image_size = _int_arg("image_size", image_size, minimum=1, accepted="> 0 (pixels)")
  num_images = _int_arg("num_images", num_images, minimum=1, accepted="> 0")
  builder = check_dataset(dataset_name, split=split, data_dir=data_dir)
  image_key = _image_key(builder, dataset_name)
  _tf()  # imports TF with the accelerators hidden
  ds = _read_encoded(builder, split, image_key, with_id=True).take(num_images)
  ds = decode_guarded(
      ds, lambda b: {"image": _resize_normalize(_decode_and_crop(b, _center_square_box), image_size)},
      lambda b: {"image": replacement_image(image_size)})
  examples = list(ds.as_numpy_iterator())
  if len(examples) < num_images:
    raise ValueError(f"num_images={num_images} is not valid: split {split!r} of "
                     f"{dataset_name!r} has only {len(examples)} examples")
  import logging  # pylint: disable=import-outside-toplevel
  for ex in examples:
    if ex[BAD_KEY]:
      logging.getLogger(__name__).warning(
          "Example %s of %r split %r cannot be decoded (%s); the mean-colour image replaces it.",
          ex[ID_KEY].decode(errors="replace"), dataset_name, split, failure_reason(ex[REASON_KEY]))
  return np.stack([ex["image"] for ex in examples]).astype(np.float32)
