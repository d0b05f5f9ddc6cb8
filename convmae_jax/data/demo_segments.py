"""`convmae_demo_segments`: an offline semantic-segmentation TFDS dataset: scikit-learn's handwritten
digits pasted onto the demo photos, labelled per pixel.

Each example is a 64x64 RGB image and a 64x64 label map (``annotation``, uint8, one channel):

  1. background: a 64x64 crop of a training (or test) photo of ``convmae_demo_photos`` (short side
     256, as that dataset stores it), at a position drawn from the example's own generator, its
     values multiplied by ``PHOTO_DIM`` = 0.5 (rounded);
  2. one digit of ``sklearn.datasets.load_digits`` (8x8, values 0..16), upscaled bicubic to a side
     of 40-56 px (``_upscale``: values u in [0, 1]) at a random position, painted in a random
     light colour (each channel 176..255) with opacity ``min(1, INK_GAIN · u)``, INK_GAIN = 1.5;
  3. labels: ``digit + 1`` where u > ``LABEL_THRESHOLD`` = 0.2 (the digit's filled stroke region,
     what the opacity shows), 0 (background) elsewhere. So 11 classes: 0 background, 1..10 digits
     "0".."9". Background is 73.7% of the train pixels (73.6% of test), each digit 2.1-3.4% of
     the train pixels; every image holds 567-1,732 digit pixels.

Why this layout (version 2.0.0). Version 1.0.0 pasted 1-3 digits of 16-28 px in a flat random
bright or dark colour and labelled only the ink above half the range: background 92.7% of the
pixels, each digit 0.7%, strokes 2-3 px wide. The demo's UperNet predicted background everywhere
(mIoU 8.4%): the input pipeline was exact and the model fitted a few fixed images, but on the
stream it learned only "digit here" (its loss fell below the class prior) without learning which
digit, and a pixel whose probability is spread over ten digit classes is still argmax background.
A plain 4-layer CNN on the same stream did no better at telling the digits apart. Recognition is
the hard part, so version 2.0.0 makes each image look like what the digits pretraining saw
(``convmae_demo_digits``: one light grey-level digit filling the frame on black): one large digit,
drawn by its grey levels (its loops stay visible), light on a dimmed photo; the label is the
thick stroke region that the head's stride-4 map resolves.

Nothing is random across builds: the generator of example i is ``np.random.default_rng((SEED,
split, i))`` and the digits of a split are a fixed set (test: load_digits rows with ``index % 5 ==
0``, train: the others, as ``convmae_demo_digits``), so the dataset is the same on every machine
with the pinned packages. Splits: ``train`` 600 images on the 16 training photos, ``test`` 150 on
the 5 held-out photos (no photo or digit image shared between splits).

Features: ``image`` (uint8 (64, 64, 3), PNG), ``annotation`` (uint8 (64, 64, 1), PNG; the class
index), ``index``. Sources and licenses: those of ``demo_photos`` and ``demo_digits``.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds

from convmae_jax.data import demo_digits, demo_photos

NAME = "convmae_demo_segments"
IMAGE_SIZE = 64
NUM_CLASSES = 11                 # background + 10 digits
CLASS_NAMES = ("background",) + tuple(f"digit_{d}" for d in range(10))
NUM_EXAMPLES = {"train": 600, "test": 150}
DIGIT_SIDE = (40, 56)            # pixels, inclusive: 5-7 px per source pixel
PHOTO_DIM = 0.5                  # the photo darkened, so the light digit stands out as in pretraining
INK_GAIN = 1.5                   # opacity min(1, gain * u): solid strokes, soft edges and loops
INK_COLOUR = (176, 255)          # each channel, inclusive
LABEL_THRESHOLD = 0.2            # of the upscaled digit's range: labelled digit above it
SEED = 20
_SPLIT_ID = {"train": 0, "test": 1}


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits
  d = load_digits()
  index = np.arange(len(d.target))
  keep = (index % demo_digits.TEST_EVERY == 0) == (split == "test")
  return d.images[keep].astype(np.float32), d.target[keep].astype(np.int64)


def _photos(split: str) -> list[np.ndarray]:
  out = []
  for p in demo_photos.PHOTOS:
    if p.split == split:
      path = demo_photos.photo_path(p)
      if path is None:
        raise FileNotFoundError(f"{NAME}: photo {p.package}/{p.path} not found; install the pinned "
                                "scikit-image, scikit-learn and matplotlib")
      out.append(demo_photos.load_photo(path))
  return out


def _upscale(digit: np.ndarray, side: int) -> np.ndarray:
  """8x8 digit (0..16) -> (side, side) float in [0, 1], PIL bicubic on the uint8 image."""
  from PIL import Image
  u8 = np.round(digit * 255.0 / 16.0).astype(np.uint8)
  big = Image.fromarray(u8).resize((side, side), Image.Resampling.BICUBIC)
  return np.asarray(big, np.float32) / 255.0


def make_example(rng: np.random.Generator, photos, digit_images, digit_labels):
  """(image uint8 (S, S, 3), labels uint8 (S, S)) of one example (module docstring)."""
  s = IMAGE_SIZE
  photo = photos[int(rng.integers(len(photos)))]
  y0 = int(rng.integers(photo.shape[0] - s + 1))
  x0 = int(rng.integers(photo.shape[1] - s + 1))
  image = np.round(photo[y0:y0 + s, x0:x0 + s] * np.float32(PHOTO_DIM))
  labels = np.zeros((s, s), np.uint8)
  k = int(rng.integers(len(digit_labels)))
  side = int(rng.integers(DIGIT_SIDE[0], DIGIT_SIDE[1] + 1))
  y, x = int(rng.integers(s - side + 1)), int(rng.integers(s - side + 1))
  colour = rng.integers(INK_COLOUR[0], INK_COLOUR[1] + 1, 3).astype(np.float32)
  u = _upscale(digit_images[k], side)
  # Painted by its grey levels (as the digits pretraining saw it), not as a flat silhouette: the
  # loops of 0, 6, 8, 9 stay visible, which the ten classes need.
  alpha = np.minimum(1.0, INK_GAIN * u)[..., None]
  window = image[y:y + side, x:x + side]
  image[y:y + side, x:x + side] = np.round(window * (1.0 - alpha) + colour * alpha)
  labels[y:y + side, x:x + side][u > LABEL_THRESHOLD] = digit_labels[k] + 1
  return np.clip(image, 0, 255).astype(np.uint8), labels


def _png(array: np.ndarray) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


class ConvmaeDemoSegments(tfds.core.GeneratorBasedBuilder):
  """Digits pasted onto real photos, labelled per pixel (no download)."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "600 train / 150 test 64x64 images, 11 classes; 1-3 digits of 16-28 px, thin ink.",
      "2.0.0": "One digit of 40-56 px per image, light grey-level ink on the photo dimmed by half, "
               "labelled where the upscaled digit exceeds 0.2 of its range (background 73.7%).",
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Offline semantic-segmentation demo: scikit-learn digits pasted onto the demo "
                     "photos; label 0 background, d + 1 for digit d."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8,
                                         encoding_format="png"),
            "annotation": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8,
                                              encoding_format="png"),
            "index": np.int64,
        }),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        metadata=tfds.core.MetadataDict(num_classes=NUM_CLASSES, class_names=list(CLASS_NAMES),
                                        photos=demo_photos.manifest(), digits=demo_digits.LICENSE),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    return {split: self._generate_examples(split) for split in NUM_EXAMPLES}

  def _generate_examples(self, split):
    photos = _photos(split)
    digit_images, digit_labels = _digits(split)
    for i in range(NUM_EXAMPLES[split]):
      rng = np.random.default_rng((SEED, _SPLIT_ID[split], i))
      image, labels = make_example(rng, photos, digit_images, digit_labels)
      yield i, {"image": io.BytesIO(_png(image)), "annotation": io.BytesIO(_png(labels)),
                "index": i}
