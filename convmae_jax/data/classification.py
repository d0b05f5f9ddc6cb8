"""Labelled input pipelines: fine-tuning, linear-probe and evaluation batches of any TFDS image
classification dataset (an ``image`` feature and a ``label`` ClassLabel; ``imagenet2012`` first).

Training batches come from the same resumable, per-process example stream as pretraining
(``pipeline.example_stream``: a fixed order, one shuffle per epoch, positioned by step), so a resumed
run sees exactly the batches it would have seen. Each example is transformed with stateless random
ops keyed on ``(seed, process, position)``:

* ``recipe="finetune"`` (timm ``create_transform`` as the official fine-tuning uses it):
  RandomResizedCrop(image_size, scale (0.08, 1), ratio (3/4, 4/3), bicubic) -> horizontal flip ->
  RandAugment (``rand-m9-mstd0.5-inc1``) on the uint8 image -> ImageNet mean/std -> RandomErasing
  (probability 0.25, per-pixel normal noise, one box);
* ``recipe="linprobe"`` (the official ``util/crop.py``): one RandomResizedCrop draw without the
  retry loop (area U(0.08, 1), log-uniform aspect in (3/4, 4/3), clipped to the image) -> flip ->
  mean/std.

Evaluation: resize the short side to ``int(image_size / crop_pct)`` (256 for 224, bicubic) ->
center crop ``image_size`` -> mean/std, every example once, padded to whole batches with
``valid = 0`` rows so metrics count each example exactly once, on any number of processes. The same
transform serves a fixed class-balanced subset of a split (``create_class_balanced_dataset``: the
first examples of each class in the split's fixed order, e.g. for a k-NN monitor).

Batches: ``{"image": float32 (B, S, S, 3), "label": int32 (B,)}`` plus ``"valid"`` (float32) in
evaluation, where ``B`` is this process's share of the global batch.
"""

from __future__ import annotations

import logging
import math
from typing import Iterator, Sequence

import numpy as np

from convmae_jax.data import augment as augment_lib
from convmae_jax.data import pipeline
from convmae_jax.data.pipeline import IMAGENET_MEAN, IMAGENET_STD

RECIPES = ("finetune", "linprobe")
DEFAULT_RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
DEFAULT_CROP_PCT = 0.875
# RandAugment fills uncovered pixels with the dataset mean as uint8 (timm: round(255 * mean)).
_FILL = tuple(int(min(255, round(255 * m))) for m in IMAGENET_MEAN)


def label_info(dataset_name: str, *, split: str = "train", data_dir: str | None = None):
  """(builder, number of classes) of a labelled image dataset; ValueError when it has no ``label``
  ClassLabel feature (naming the features it has)."""
  import tensorflow_datasets as tfds

  builder = pipeline.check_dataset(dataset_name, split=split, data_dir=data_dir)
  feats = builder.info.features
  if "label" not in feats or not isinstance(feats["label"], tfds.features.ClassLabel):
    raise ValueError(
        f"dataset {dataset_name!r} has no 'label' ClassLabel feature (features: "
        f"{list(feats.keys())}); fine-tuning, linear probing and evaluation need an image "
        "classification dataset such as 'imagenet2012' or 'convmae_demo_digits'")
  return builder, int(feats["label"].num_classes)


# ----------------------------------------------------------------------------- transforms


def _single_draw_crop_box(height, width, seed, scale, ratio):
  """The linear probe's RandomResizedCrop (TF/BYOL style, official util/crop.py): one draw of area
  and log-uniform aspect, w = round(sqrt(area*r)), h = round(sqrt(area/r)), clipped to the image,
  uniform offset."""
  tf = pipeline._tf()  # noqa: F841 - the nested transforms use it
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  s_area, s_off = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  u = tf.random.stateless_uniform([2], seed=s_area, dtype=tf.float32)
  area = h * w * (scale[0] + u[0] * (scale[1] - scale[0]))
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + u[1] * (log_hi - log_lo))
  cw = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32), 1, width)
  ch = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32), 1, height)
  v = tf.random.stateless_uniform([2], seed=s_off, dtype=tf.float32)
  y = tf.minimum(tf.cast(tf.floor(v[0] * tf.cast(height - ch + 1, tf.float32)), tf.int32), height - ch)
  x = tf.minimum(tf.cast(tf.floor(v[1] * tf.cast(width - cw + 1, tf.float32)), tf.int32), width - cw)
  return y, x, ch, cw


def _resize_uint8(crop, size_hw):
  """Bicubic antialiased resize with uint8 rounding (like PIL); float32 values in [0, 255]."""
  tf = pipeline._tf()  # noqa: F841 - the nested transforms use it
  x = tf.image.resize(crop, size_hw, method="bicubic", antialias=True)
  return tf.round(tf.clip_by_value(x, 0.0, 255.0))


def _normalize(x):
  tf = pipeline._tf()  # noqa: F841 - the nested transforms use it
  return tf.cast((x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD, tf.float32)


def eval_transform(image_bytes, image_size: int, crop_pct: float = DEFAULT_CROP_PCT):
  """Resize(short side int(image_size / crop_pct), bicubic) -> CenterCrop(image_size) -> mean/std,
  as torchvision does it: the long side becomes int(resize * long / short), the crop offset
  round((side - image_size) / 2)."""
  tf = pipeline._tf()  # noqa: F841 - the nested transforms use it
  resize = int(image_size / crop_pct)
  img = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
  img = tf.ensure_shape(img, [None, None, 3])
  hw = tf.shape(img)[:2]
  h, w = hw[0], hw[1]
  short = tf.cast(tf.minimum(h, w), tf.float64)
  new_h = tf.where(h <= w, resize, tf.cast(tf.floor(resize * tf.cast(h, tf.float64) / short), tf.int32))
  new_w = tf.where(w <= h, resize, tf.cast(tf.floor(resize * tf.cast(w, tf.float64) / short), tf.int32))
  x = _resize_uint8(img, tf.stack([new_h, new_w]))
  top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float32) / 2.0), tf.int32)
  x = x[top:top + image_size, left:left + image_size, :]
  return tf.ensure_shape(_normalize(x), [image_size, image_size, 3])


def train_transform(image_bytes, key, *, image_size: int, recipe: str, scale, ratio,
                    rand_augment: augment_lib.RandAugmentConfig | None, reprob: float,
                    hflip: bool = True):
  """One training example of ``recipe`` from its encoded bytes and its stateless key."""
  tf = pipeline._tf()  # noqa: F841 - the nested transforms use it
  k_crop, k_flip, k_ra, k_erase = tf.unstack(tf.random.experimental.stateless_split(key, 4))
  if recipe == "finetune":
    box = lambda h, w: pipeline._random_resized_crop_box(h, w, k_crop, scale, ratio)
  else:
    box = lambda h, w: _single_draw_crop_box(h, w, k_crop, scale, ratio)
  x = _resize_uint8(pipeline._decode_and_crop(image_bytes, box), [image_size, image_size])
  if hflip:
    flip = tf.random.stateless_uniform([], seed=k_flip) < 0.5
    x = tf.cond(flip, lambda: tf.reverse(x, axis=[1]), lambda: x)
  if rand_augment is not None:
    x = tf.cast(augment_lib.rand_augment(tf.cast(x, tf.uint8), k_ra, rand_augment, fill=_FILL),
                tf.float32)
  x = _normalize(x)
  if reprob > 0:
    x = augment_lib.random_erasing(x, k_erase, probability=reprob)
  return tf.ensure_shape(x, [image_size, image_size, 3])


# ----------------------------------------------------------------------------- public API


def create_train_dataset(
    dataset_name: str,
    *,
    split: str,
    global_batch_size: int,
    image_size: int,
    seed: int,
    recipe: str = "finetune",
    process_index: int | None = None,
    process_count: int | None = None,
    data_dir: str | None = None,
    start_step: int = 0,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = pipeline.DEFAULT_RATIO,
    rand_augment: str = DEFAULT_RAND_AUGMENT,
    reprob: float = 0.25,
    hflip: bool = True,
    shuffle_buffer: int = pipeline.DEFAULT_SHUFFLE_BUFFER,
    prefetch: int = 2,
    threads: int | None = None,
) -> pipeline.PretrainIterator:
  """Infinite iterator of this process's labelled training batches (numpy).

  Elements: ``{"image": float32 (global_batch_size // process_count, S, S, 3), "label": int32 (B,)}``
  with ``bad``, ``example_id``, ``bad_reason`` per example (``pipeline.decode_guarded``: an
  undecodable record is replaced by the mean-colour image, keeping its label and its place).
  Deterministic and resumable like ``create_pretrain_dataset``: ``start_step=k`` yields exactly the
  batches ``k, k+1, ...`` of the ``start_step=0`` sequence. ``recipe``: "finetune" or "linprobe"
  (module docstring); ``rand_augment`` "" and ``reprob`` 0 turn those off (fine-tuning only).
  """
  if recipe not in RECIPES:
    raise ValueError(f"recipe={recipe!r} is not valid: expected one of {RECIPES}")
  process_index, process_count = pipeline._process_args(process_index, process_count)
  image_size = pipeline._int_arg("image_size", image_size, minimum=1, accepted="> 0 (pixels)")
  local_batch = pipeline.batch_args(global_batch_size, process_count)
  start_step = pipeline._int_arg("start_step", start_step, minimum=0, accepted=">= 0")
  scale = pipeline._range_arg("scale", scale, 0.0, 1.0, "(lo, hi) with 0 < lo <= hi <= 1")
  ratio = pipeline._range_arg("ratio", ratio, 0.0, math.inf, "(lo, hi) with 0 < lo <= hi")
  if not 0.0 <= float(reprob) <= 1.0:
    raise ValueError(f"reprob={reprob!r} is not valid: expected a probability in [0, 1]")
  ra = augment_lib.parse_rand_augment(rand_augment) if (rand_augment and recipe == "finetune") else None
  reprob = float(reprob) if recipe == "finetune" else 0.0

  builder, _ = label_info(dataset_name, split=split, data_dir=data_dir)
  image_key = pipeline._image_key(builder, dataset_name)
  tf = pipeline._tf()  # noqa: F841 - the nested transforms use it
  stream, n = pipeline.example_stream(
      builder, dataset_name, split, image_key=image_key, label_key="label", seed=seed,
      process_index=process_index, process_count=process_count, local_batch=local_batch,
      start_step=start_step, shuffle_buffer=shuffle_buffer)
  augment_key = pipeline.augment_seed(seed, process_index)

  def transform(index, image_bytes, label):
    key = pipeline._example_seed(augment_key, index)
    image = train_transform(image_bytes, key, image_size=image_size, recipe=recipe, scale=scale,
                            ratio=ratio, rand_augment=ra, reprob=reprob, hflip=hflip)
    return {"image": image, "label": label}

  ds = pipeline.finish(pipeline.decode_guarded(stream, transform, lambda index, image_bytes, label: {
      "image": pipeline.replacement_image(image_size), "label": label}), local_batch, prefetch, threads)
  return pipeline.PretrainIterator(ds, local_batch_size=local_batch,
                                   num_examples=n, process_index=process_index,
                                   process_count=process_count, start_step=start_step)


class EvalData:
  """Re-iterable evaluation batches of one split: every example exactly once, padded.

  Iterating yields ``{"image", "label", "valid"}`` numpy batches of ``local_batch_size`` rows;
  ``num_batches`` is the same on every process (the largest slice decides), ``num_examples`` is the
  split's size (all processes).
  """

  def __init__(self, dataset, *, num_batches: int, num_examples: int, local_batch_size: int):
    self.dataset = dataset
    self.num_batches = num_batches
    self.num_examples = num_examples
    self.local_batch_size = local_batch_size

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    for batch in self.dataset.as_numpy_iterator():
      for i in np.flatnonzero(batch.pop(pipeline.BAD_KEY)):
        logging.getLogger(__name__).warning(
            "Evaluation example %s cannot be decoded (%s); it is left out of the accuracy.",
            batch[pipeline.ID_KEY][i].decode(errors="replace"),
            pipeline.failure_reason(batch[pipeline.REASON_KEY][i]))
      batch.pop(pipeline.ID_KEY)
      batch.pop(pipeline.REASON_KEY)
      yield batch

  def __len__(self) -> int:
    return self.num_batches


def create_eval_dataset(
    dataset_name: str,
    *,
    split: str,
    global_batch_size: int,
    image_size: int,
    crop_pct: float = DEFAULT_CROP_PCT,
    process_index: int | None = None,
    process_count: int | None = None,
    data_dir: str | None = None,
    num_examples: int | None = None,
) -> EvalData:
  """Evaluation batches of ``split`` (see :class:`EvalData`); ``num_examples`` limits the split to
  its first examples (e.g. a quick evaluation during training)."""
  import tensorflow_datasets as tfds

  process_index, process_count = pipeline._process_args(process_index, process_count)
  image_size = pipeline._int_arg("image_size", image_size, minimum=1, accepted="> 0 (pixels)")
  local_batch = pipeline.batch_args(global_batch_size, process_count)
  if not 0.0 < float(crop_pct) <= 1.0:
    raise ValueError(f"crop_pct={crop_pct!r} is not valid: expected a fraction in (0, 1]")
  builder, _ = label_info(dataset_name, split=split, data_dir=data_dir)
  image_key = pipeline._image_key(builder, dataset_name)
  tf = pipeline._tf()  # noqa: F841 - the nested transforms use it

  total = pipeline._cardinality(pipeline._read_encoded(builder, split, image_key))
  if num_examples is not None and 0 < num_examples < total:
    split = f"{split}[:{int(num_examples)}]"
    total = int(num_examples)
  proc_split = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
  ds = pipeline._read_encoded(builder, proc_split, image_key, "label", with_id=True)
  n = pipeline._cardinality(ds)
  num_batches = int(math.ceil(math.ceil(total / process_count) / local_batch))
  # An undecodable example counts as padding (valid 0): it is left out of the accuracy.
  ds = pipeline.decode_guarded(
      ds, lambda b, l: {"image": eval_transform(b, image_size, crop_pct), "label": l,
                        "valid": tf.constant(1.0, tf.float32)},
      lambda b, l: {"image": pipeline.replacement_image(image_size), "label": l,
                    "valid": tf.constant(0.0, tf.float32)})
  ds = ds.map(lambda ex: {k: ex[k] for k in ("image", "label", "valid", pipeline.BAD_KEY,
                                             pipeline.ID_KEY, pipeline.REASON_KEY)})
  pad = num_batches * local_batch - n
  if pad:
    filler = {"image": tf.zeros([image_size, image_size, 3], tf.float32),
              "label": tf.constant(0, tf.int32), "valid": tf.constant(0.0, tf.float32),
              pipeline.BAD_KEY: tf.constant(False), pipeline.ID_KEY: tf.constant(""),
              pipeline.REASON_KEY: tf.constant("")}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(filler).repeat(pad))
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(2)
  return EvalData(ds, num_batches=num_batches, num_examples=total, local_batch_size=local_batch)


class ClassBalancedSubset(EvalData):
  """:class:`EvalData` of a fixed class-balanced subset of a split
  (``create_class_balanced_dataset``).

  Batches also carry ``"rank"`` (int32): the example's place in the whole subset (0 .. n-1, the
  split's order), and a large value on padding rows, so that a consumer can put gathered rows back
  in one order whatever the number of processes. ``num_classes`` is the label feature's;
  ``per_class`` (num_classes,) counts the subset's examples of each class (all processes);
  ``ids`` are this process's TFDS ids, by rank.
  """

  PAD_RANK = np.iinfo(np.int32).max

  def __init__(self, dataset, *, num_batches: int, num_examples: int, local_batch_size: int,
               num_classes: int, per_class: np.ndarray, ids: list[str]):
    super().__init__(dataset, num_batches=num_batches, num_examples=num_examples,
                     local_batch_size=local_batch_size)
    self.num_classes = num_classes
    self.per_class = per_class
    self.ids = ids


def first_per_class(builder, split: str, *, image_key: str, per_class: int,
                    num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(positions, labels), int64, of the first ``per_class`` examples of each class in the fixed
  order of ``split`` (ascending positions; fewer for a class with fewer examples). Reads the labels
  only (images stay encoded) and stops as soon as every class has its share."""
  labels = pipeline._read_encoded(builder, split, image_key, "label").map(lambda _, label: label)
  counts = np.zeros(num_classes, np.int64)
  positions, chosen = [], []
  offset = 0
  for chunk in labels.batch(4096).as_numpy_iterator():
    for i, label in enumerate(chunk.tolist()):
      if counts[label] < per_class:
        counts[label] += 1
        positions.append(offset + i)
        chosen.append(label)
    offset += len(chunk)
    if counts.min() >= per_class:
      break
  return np.asarray(positions, np.int64), np.asarray(chosen, np.int64)


def create_class_balanced_dataset(
    dataset_name: str,
    *,
    split: str,
    per_class: int,
    global_batch_size: int,
    image_size: int,
    crop_pct: float = DEFAULT_CROP_PCT,
    process_index: int | None = None,
    process_count: int | None = None,
    data_dir: str | None = None,
) -> ClassBalancedSubset:
  """Evaluation batches (``eval_transform``) of a fixed, class-balanced subset of ``split``: the
  first ``per_class`` examples of each class in the split's deterministic order (TFDS order,
  ``shuffle_files=False``), every one of them once (see :class:`ClassBalancedSubset`).

  The subset does not depend on the number of processes: the example of rank r goes to process
  ``r % process_count``. Its encoded images are read from disk once, here (the labels up to the
  last example chosen, then the chosen records); each iteration decodes them again. An undecodable
  example is a ``valid = 0`` row. ValueError names a bad dataset, split, or a split without labels.
  """
  process_index, process_count = pipeline._process_args(process_index, process_count)
  image_size = pipeline._int_arg("image_size", image_size, minimum=1, accepted="> 0 (pixels)")
  per_class = pipeline._int_arg("per_class", per_class, minimum=1, accepted=">= 1")
  local_batch = pipeline.batch_args(global_batch_size, process_count)
  if not 0.0 < float(crop_pct) <= 1.0:
    raise ValueError(f"crop_pct={crop_pct!r} is not valid: expected a fraction in (0, 1]")
  builder, num_classes = label_info(dataset_name, split=split, data_dir=data_dir)
  image_key = pipeline._image_key(builder, dataset_name)
  tf = pipeline._tf()

  positions, labels = first_per_class(builder, split, image_key=image_key, per_class=per_class,
                                      num_classes=num_classes)
  total = len(positions)
  if total == 0:
    raise ValueError(f"split={split!r} of dataset {dataset_name!r} has no examples")
  rank_of = np.full(int(positions[-1]) + 1, -1, np.int64)
  rank_of[positions] = np.arange(total)
  mine = np.where((rank_of >= 0) & (rank_of % process_count == process_index), rank_of, -1)
  mine = tf.constant(mine, tf.int64)
  chosen = (pipeline._read_encoded(builder, split, image_key, "label", with_id=True)
            .take(len(rank_of)).enumerate()
            .filter(lambda i, ex: tf.gather(mine, i) >= 0)
            .map(lambda i, ex: (ex[0], ex[1], tf.cast(tf.gather(mine, i), tf.int32), ex[2])))
  records = list(chosen.as_numpy_iterator())
  n = len(records)
  # The chosen records, held in memory as encoded bytes: later iterations never read the split.
  stream = tf.data.Dataset.from_tensor_slices((
      tf.constant([r[0] for r in records], tf.string, shape=[n]),
      tf.constant([r[1] for r in records], tf.int32, shape=[n]),
      tf.constant([r[2] for r in records], tf.int32, shape=[n]),
      tf.constant([r[3] for r in records], tf.string, shape=[n])))
  ds = pipeline.decode_guarded(
      stream, lambda b, l, r: {"image": eval_transform(b, image_size, crop_pct), "label": l,
                               "valid": tf.constant(1.0, tf.float32), "rank": r},
      lambda b, l, r: {"image": pipeline.replacement_image(image_size), "label": l,
                       "valid": tf.constant(0.0, tf.float32), "rank": r})
  num_batches = int(math.ceil(math.ceil(total / process_count) / local_batch))
  pad = num_batches * local_batch - n
  if pad:
    filler = {"image": tf.zeros([image_size, image_size, 3], tf.float32),
              "label": tf.constant(0, tf.int32), "valid": tf.constant(0.0, tf.float32),
              "rank": tf.constant(ClassBalancedSubset.PAD_RANK, tf.int32),
              pipeline.BAD_KEY: tf.constant(False), pipeline.ID_KEY: tf.constant(""),
              pipeline.REASON_KEY: tf.constant("")}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(filler).repeat(pad))
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(2)
  return ClassBalancedSubset(
      ds, num_batches=num_batches, num_examples=total, local_batch_size=local_batch,
      num_classes=num_classes, per_class=np.bincount(labels, minlength=num_classes),
      ids=[r[3].decode() for r in records])
