"""Semantic-segmentation input pipelines: any TFDS dataset with an ``image`` and a per-pixel label
map (``annotation`` in ``scene_parse150`` and ``convmae_demo_segments``; ``mask_key`` otherwise).

Reading: the split's encoded images and label maps are read once into host memory (ADE20K's train
split is about 1 GB of JPEG/PNG), in the split's fixed order; every epoch is a permutation of it
drawn from ``(seed, epoch)``, so the example at global position ``p = step · batch + row`` is known
without reading anything before it and a resumed run sees exactly the batches of an uninterrupted
one. Each process decodes only its rows. Label maps are read from their first channel.

Training transform (mmseg 0.11's ADE20K pipeline; randomness from ``(seed, p)``):
  1. ``reduce_zero_label``: 0 -> 255 (ignored), every other class c -> c − 1;
  2. random resize: r ~ U(ratio_range), the image is scaled by ``min(L·r / long side, S·r / short
     side)`` for ``scale = (L, S)`` (mmcv ``rescale_size``, sizes rounded half up), bilinear for the
     image, nearest for the labels;
  3. random crop to ``crop`` (the image's own size where smaller) with ``cat_max_ratio``: up to 10
     draws, the first whose most frequent labelled class covers less than the ratio of the labelled
     pixels (and that has at least 2 classes) is kept, else the last draw;
  4. horizontal flip with probability 1/2;
  5. photometric distortion (mmseg ``PhotoMetricDistortion``), each with probability 1/2:
     brightness + U(−32, 32); contrast × U(0.5, 1.5) (before or after the HSV steps, chosen at
     random); saturation × U(0.5, 1.5); hue + U{−18..18} on OpenCV's 0..180 scale; clipped to
     0..255 and truncated to uint8 after each step, as mmseg. Simplification: the HSV conversion is
     matplotlib's float one, not OpenCV's uint8 one (the same colours up to rounding);
  6. ImageNet mean/std (×255); padded to ``crop`` with 0 (image) and 255 (labels).

Evaluation transform: resize (keep ratio) to fit ``scale`` exactly as mmseg's test ``Resize``,
labels nearest to the same size, padded into a fixed ``canvas`` (H, W) -- an image that does not fit
is scaled down further -- with ``valid_hw`` its size, so one compiled program serves the split.
Simplification: scores are computed at the test resolution against the label map resized (nearest)
to it, where mmseg resizes the logits back to the original label map.

Batches: ``{"image": float32 (B, H, W, 3), "label": int32 (B, H, W)}`` (+ ``"valid_hw"`` int32 (B, 2)
in evaluation, whose padding rows are all-255 labels), B this process's rows of the global batch.

Bad records: an example whose image or label map cannot be decoded, or whose two sizes differ, is
never dropped (that would shift every later batch) nor allowed to stop the run. In training it is
replaced by the mean-colour image with all-ignored labels (it adds nothing to the loss) and flagged
in the batch (``bad``, ``example_id`` = ``"<split>[<index>]"``, the TFDS slice that reads it back,
``bad_reason`` = the decoder's message), so the trainer logs it once and stops only past
``max_bad_fraction`` (as for pretraining); in evaluation it is logged and left out of the scores.
"""

from __future__ import annotations

import io
import logging
from typing import Iterator

import numpy as np

from convmae_jax.data import pipeline
from convmae_jax.data.pipeline import IMAGENET_MEAN, IMAGENET_STD

IGNORE_INDEX = 255
_MEAN = np.asarray(IMAGENET_MEAN, np.float32) * 255.0
_STD = np.asarray(IMAGENET_STD, np.float32) * 255.0
# Known datasets: their label-map feature and number of classes after reduce_zero_label.
KNOWN = {"scene_parse150": {"mask_key": "annotation", "num_classes": 150, "reduce_zero_label": True}}


def mask_info(dataset_name: str, *, split: str, mask_key: str, data_dir: str | None = None):
  """(builder, number of classes or None) of a segmentation dataset; ValueError when the image or
  label-map feature is missing (naming the features it has)."""
  import tensorflow_datasets as tfds

  builder = pipeline.check_dataset(dataset_name, split=split, data_dir=data_dir)
  feats = builder.info.features
  if mask_key not in feats or not isinstance(feats[mask_key], tfds.features.Image):
    raise ValueError(f"dataset {dataset_name!r} has no per-pixel label map {mask_key!r} (an Image "
                     f"feature); its features are {list(feats.keys())}; set config.mask_key to the "
                     "segmentation mask feature (e.g. 'annotation' for scene_parse150)")
  n = (builder.info.metadata or {}).get("num_classes") if builder.info.metadata else None
  base = dataset_name.split(":")[0].split("/")[0]
  if n is None and base in KNOWN:
    n = KNOWN[base]["num_classes"]
  return builder, (int(n) if n is not None else None)


def class_names(builder) -> list[str] | None:
  meta = builder.info.metadata or {}
  names = meta.get("class_names") if meta else None
  return list(names) if names else None


def read_split(builder, split: str, *, mask_key: str, num_examples: int | None = None):
  """[(encoded image bytes, encoded label-map bytes)] of the split in its fixed order."""
  import tensorflow_datasets as tfds

  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding(),
                                    mask_key: tfds.decode.SkipDecoding()})
  if num_examples:
    ds = ds.take(num_examples)
  return [(bytes(ex["image"]), bytes(ex[mask_key])) for ex in tfds.as_numpy(ds)]


class BadRecord(ValueError):
  """An example whose image or label map cannot be decoded, or whose sizes differ."""


def decode(image_bytes: bytes, mask_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
  """(RGB uint8 (h, w, 3), labels uint8 (h, w)) from encoded bytes (first channel of the map).

  Raises BadRecord naming what failed: the image or the label map cannot be decoded (truncated or
  not an image), or their sizes differ."""
  from PIL import Image
  arrays = {}
  for name, raw in (("image", image_bytes), ("label map", mask_bytes)):
    try:
      with Image.open(io.BytesIO(raw)) as im:
        arrays[name] = np.asarray(im.convert("RGB") if name == "image" else im, np.uint8)
    except (OSError, ValueError, SyntaxError) as e:   # PIL's errors for broken files
      raise BadRecord(f"the {name} cannot be decoded ({type(e).__name__}: {e})") from None
  image, labels = arrays["image"], arrays["label map"]
  if labels.ndim == 3:
    labels = labels[..., 0]
  if image.shape[:2] != labels.shape:
    raise BadRecord(f"the image is {image.shape[1]}x{image.shape[0]} but its label map "
                    f"{labels.shape[1]}x{labels.shape[0]}")
  return image, labels


def reduce_zero_label(labels: np.ndarray) -> np.ndarray:
  """mmseg's reduce_zero_label: 0 -> 255, c -> c − 1 (255 stays ignored)."""
  out = labels.astype(np.int32) - 1
  out[labels == 0] = IGNORE_INDEX
  out[labels == IGNORE_INDEX] = IGNORE_INDEX
  return out.astype(np.uint8)


def rescale_size(h: int, w: int, scale: tuple[int, int], ratio: float = 1.0) -> tuple[int, int]:
  """mmcv ``rescale_size`` with keep_ratio: (h', w') of an (h, w) image fitted into ``scale`` =
  (long, short) times ``ratio``."""
  long_edge, short_edge = max(scale) * ratio, min(scale) * ratio
  factor = min(long_edge / max(h, w), short_edge / min(h, w))
  return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def _resize(image: np.ndarray, labels: np.ndarray, hw: tuple[int, int]):
  from PIL import Image
  if hw == image.shape[:2]:
    return image, labels
  size = (hw[1], hw[0])
  image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR), np.uint8)
  labels = np.asarray(Image.fromarray(labels).resize(size, Image.Resampling.NEAREST), np.uint8)
  return image, labels


def random_crop(rng, image, labels, crop: tuple[int, int], cat_max_ratio: float):
  """mmseg ``RandomCrop`` with ``cat_max_ratio`` (module docstring, step 3)."""
  ch, cw = crop
  h, w = labels.shape

  def draw():
    y = int(rng.integers(max(h - ch, 0) + 1))
    x = int(rng.integers(max(w - cw, 0) + 1))
    return y, x

  y, x = draw()
  if cat_max_ratio < 1.0:
    for _ in range(10):
      window = labels[y:y + ch, x:x + cw]
      _, counts = np.unique(window[window != IGNORE_INDEX], return_counts=True)
      if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
        break
      y, x = draw()
  return image[y:y + ch, x:x + cw], labels[y:y + ch, x:x + cw]


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(rng, image: np.ndarray) -> np.ndarray:
  """mmseg ``PhotoMetricDistortion`` (module docstring, step 5) on RGB uint8."""
  from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
  if rng.integers(2):
    image = _convert(image, beta=rng.uniform(-32, 32))
  mode = rng.integers(2)
  if mode == 1 and rng.integers(2):
    image = _convert(image, alpha=rng.uniform(0.5, 1.5))
  sat = rng.uniform(0.5, 1.5) if rng.integers(2) else None
  hue = int(rng.integers(-18, 19)) if rng.integers(2) else None
  if sat is not None or hue is not None:
    hsv = rgb_to_hsv(image.astype(np.float32) / 255.0)
    if sat is not None:
      hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0.0, 1.0)
    if hue is not None:
      hsv[..., 0] = (hsv[..., 0] + hue / 180.0) % 1.0
    image = np.clip(np.round(hsv_to_rgb(hsv) * 255.0), 0, 255).astype(np.uint8)
  if mode == 0 and rng.integers(2):
    image = _convert(image, alpha=rng.uniform(0.5, 1.5))
  return image


def normalize(image: np.ndarray) -> np.ndarray:
  return (image.astype(np.float32) - _MEAN) / _STD


def train_example(image_bytes: bytes, mask_bytes: bytes, rng, *, crop: tuple[int, int],
                  scale: tuple[int, int], ratio_range: tuple[float, float], cat_max_ratio: float,
                  reduce_zero: bool, flip: bool = True, photometric: bool = True):
  """One training example: (float32 (ch, cw, 3), int32 (ch, cw)) (module docstring)."""
  image, labels = decode(image_bytes, mask_bytes)
  if reduce_zero:
    labels = reduce_zero_label(labels)
  r = rng.uniform(*ratio_range)
  image, labels = _resize(image, labels, rescale_size(*labels.shape, scale, r))
  image, labels = random_crop(rng, image, labels, crop, cat_max_ratio)
  if flip and rng.random() < 0.5:
    image, labels = image[:, ::-1], labels[:, ::-1]
  if photometric:
    image = photometric_distortion(rng, np.ascontiguousarray(image))
  out_image = np.zeros(crop + (3,), np.float32)
  out_labels = np.full(crop, IGNORE_INDEX, np.int32)
  h, w = labels.shape
  out_image[:h, :w] = normalize(image)
  out_labels[:h, :w] = labels
  return out_image, out_labels


def eval_example(image_bytes: bytes, mask_bytes: bytes, *, scale: tuple[int, int],
                 canvas: tuple[int, int], reduce_zero: bool):
  """(float32 canvas image, int32 canvas labels (255 outside), (h, w)) of one evaluation image."""
  image, labels = decode(image_bytes, mask_bytes)
  if reduce_zero:
    labels = reduce_zero_label(labels)
  h, w = rescale_size(*labels.shape, scale)
  if h > canvas[0] or w > canvas[1]:              # shrink into the canvas, keeping the ratio
    f = min(canvas[0] / h, canvas[1] / w)
    h, w = max(1, int(h * f)), max(1, int(w * f))
  image, labels = _resize(image, labels, (h, w))
  out_image = np.zeros(tuple(canvas) + (3,), np.float32)
  out_labels = np.full(tuple(canvas), IGNORE_INDEX, np.int32)
  out_image[:h, :w] = normalize(image)
  out_labels[:h, :w] = labels
  return out_image, out_labels, (h, w)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The permutation of the split's n examples for ``epoch``."""
  return np.random.default_rng((seed, 7, epoch)).permutation(n)


class TrainBatches:
  """This process's training batches from ``start_step`` on (module docstring); an iterator.
  ``split`` names the examples' split in the ids of bad records."""

  def __init__(self, examples, *, global_batch_size: int, seed: int, start_step: int,
               process_index: int, process_count: int, split: str = "train", **transform):
    self.examples = examples
    self.split = split
    self.batch = global_batch_size
    self.local = global_batch_size // process_count
    self.offset = process_index * self.local
    self.seed = seed
    self.step = start_step
    self.transform = transform
    self._orders: dict[int, np.ndarray] = {}

  def _example(self, position: int):
    n = len(self.examples)
    epoch, i = divmod(position, n)
    if epoch not in self._orders:
      self._orders = {epoch: epoch_order(self.seed, epoch, n)}
    rng = np.random.default_rng((self.seed, 11, position))
    index = int(self._orders[epoch][i])
    try:
      return train_example(*self.examples[index], rng, **self.transform) + (index, "")
    except BadRecord as e:
      crop = self.transform["crop"]
      return (np.zeros(tuple(crop) + (3,), np.float32), np.full(crop, IGNORE_INDEX, np.int32),
              index, str(e))

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    start = self.step * self.batch + self.offset
    rows = [self._example(start + r) for r in range(self.local)]
    self.step += 1
    return {"image": np.stack([r[0] for r in rows]), "label": np.stack([r[1] for r in rows]),
            pipeline.BAD_KEY: np.asarray([bool(r[3]) for r in rows]),
            pipeline.ID_KEY: np.asarray([f"{self.split}[{r[2]}]".encode() for r in rows],
                                        dtype=object),
            pipeline.REASON_KEY: np.asarray([r[3].encode() for r in rows], dtype=object)}

  def close(self) -> None:
    pass


class EvalBatches:
  """Every example of the split once, in order, as this process's rows of global batches of
  ``global_batch_size``; the last batch padded with all-ignored rows. Iterable many times
  (decoded once, kept)."""

  def __init__(self, examples, *, global_batch_size: int, process_index: int, process_count: int,
               scale, canvas, reduce_zero: bool, split: str = "validation"):
    self.num_examples = len(examples)
    self.bad = []                      # (example id, reason) of the records left out
    local = global_batch_size // process_count
    n_batches = -(-len(examples) // global_batch_size)
    canvas = tuple(int(c) for c in canvas)
    self.batches = []
    for b in range(n_batches):
      rows = []
      for r in range(local):
        i = b * global_batch_size + process_index * local + r
        bad = None
        if i < len(examples):
          try:
            rows.append(eval_example(*examples[i], scale=scale, canvas=canvas,
                                     reduce_zero=reduce_zero))
          except BadRecord as e:
            bad = (f"{split}[{i}]", str(e))
            self.bad.append(bad)
            logging.getLogger(__name__).warning(
                "Evaluation example %s cannot be used (%s); it is left out of the scores.", *bad)
        if i >= len(examples) or bad:
          rows.append((np.zeros(canvas + (3,), np.float32),
                       np.full(canvas, IGNORE_INDEX, np.int32), canvas))
      self.batches.append({"image": np.stack([r[0] for r in rows]),
                           "label": np.stack([r[1] for r in rows]),
                           "valid_hw": np.asarray([r[2] for r in rows], np.int32)})

  def __iter__(self):
    return iter(self.batches)
