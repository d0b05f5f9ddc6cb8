"""`convmae_demo_digits`: an offline, labelled TFDS dataset of scikit-learn's handwritten digits.

The images are the 1,797 8x8 digits of `sklearn.datasets.load_digits()` (values 0..16, 10 classes),
which ship inside the scikit-learn package: nothing is downloaded. Each image is

  1. scaled to 0..255: ``round(v * 255 / 16)`` (half up; v is an integer, so only v = 8 -> 127.5
     is a tie and becomes 128), as uint8;
  2. upscaled 8 -> 32 with PIL's bicubic filter (`Image.Resampling.BICUBIC`, on the uint8 grey
     image, so PIL rounds and clips to 0..255);
  3. replicated to 3 channels (grey RGB) and stored as PNG (lossless: the decoded pixels are
     exactly those of steps 1-3).

Splits are fixed and use no randomness: ``test`` = rows with ``index % 5 == 0``, ``train`` = the
other rows. load_digits' rows are not sorted by class, so this is close to stratified:

  ========  =====  =============================================================
  split     total  per class 0 .. 9
  ========  =====  =============================================================
  train     1,437  136, 154, 151, 135, 143, 143, 151, 153, 138, 133
  test        360   42,  28,  26,  48,  38,  39,  30,  26,  36,  47
  all       1,797  178, 182, 177, 183, 181, 182, 181, 179, 174, 180
  ========  =====  =============================================================

Features: ``image`` (uint8, (32, 32, 3), the 3 channels equal), ``label`` (ClassLabel "0".."9"),
``index`` (int64, the row in ``load_digits()``). Supervised keys: (image, label).

Source and license: the test set of the UCI "Optical Recognition of Handwritten Digits" data set
(E. Alpaydin and C. Kaynak, Bogazici University, 1998; https://doi.org/10.24432/C50P49; CC BY 4.0
as listed on the UCI repository page), as shipped with scikit-learn (BSD-3-Clause package) and
documented in `sklearn.datasets.load_digits` / the "Optical recognition of handwritten digits
dataset" section of the scikit-learn user guide, which cites C. Kaynak (1995), MSc thesis, Bogazici
University, and E. Alpaydin, C. Kaynak (1998), Cascading Classifiers, Kybernetika. The same
attribution is stored in the builder's metadata and citation.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import tensorflow_datasets as tfds

NAME = "convmae_demo_digits"
IMAGE_SIZE = 32          # S: stored images are (S, S, 3)
SOURCE_SIZE = 8          # load_digits images are 8x8
MAX_VALUE = 16           # load_digits pixel values are integers 0..16
TEST_EVERY = 5           # test split = rows with index % TEST_EVERY == 0
NUM_CLASSES = 10
SPLITS = ("train", "test")

LICENSE = ("UCI Optical Recognition of Handwritten Digits data set (E. Alpaydin, C. Kaynak, 1998), "
           "CC BY 4.0 (UCI Machine Learning Repository); shipped with scikit-learn "
           "(BSD-3-Clause package) as sklearn.datasets.load_digits.")
HOMEPAGE = "https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits"
CITATION = """\
@misc{alpaydin1998optdigits,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {{Optical Recognition of Handwritten Digits}},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
  doi = {10.24432/C50P49}
}
@mastersthesis{kaynak1995,
  author = {Kaynak, C.},
  title = {Methods of Combining Multiple Classifiers and Their Applications to Handwritten Digit
           Recognition},
  school = {Institute of Graduate Studies in Science and Engineering, Bogazici University},
  year = {1995}
}
@article{alpaydin1998cascading,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Cascading Classifiers},
  journal = {Kybernetika},
  year = {1998}
}
@article{scikit-learn,
  author = {Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and
            Grisel, O. and Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and
            Vanderplas, J. and Passos, A. and Cournapeau, D. and Brucher, M. and Perrot, M. and
            Duchesnay, E.},
  title = {Scikit-learn: Machine Learning in {P}ython},
  journal = {Journal of Machine Learning Research},
  volume = {12},
  pages = {2825--2830},
  year = {2011}
}
"""


def split_of(index: int) -> str:
  """The fixed split of row `index` of load_digits: "test" when index % 5 == 0, else "train"."""
  return "test" if index % TEST_EVERY == 0 else "train"


def to_image(digit) -> np.ndarray:
  """One load_digits image (8, 8), values 0..16 -> uint8 grey RGB (32, 32, 3), values 0..255.

  Scale (half up) to uint8, PIL bicubic upscale 8 -> 32, replicate to 3 channels.
  """
  from PIL import Image

  digit = np.asarray(digit, np.float64)
  if digit.shape != (SOURCE_SIZE, SOURCE_SIZE):
    raise ValueError(f"expected an ({SOURCE_SIZE}, {SOURCE_SIZE}) digit, got {digit.shape}")
  # floor(x + 0.5): half up, explicit (np.round would be half-to-even; same result here).
  grey = np.floor(digit * 255.0 / MAX_VALUE + 0.5).astype(np.uint8)
  big = Image.fromarray(grey).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)  # mode "L"
  return np.repeat(np.asarray(big, np.uint8)[:, :, None], 3, axis=2)


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """(images float64 (1797, 8, 8) with values 0..16, labels int64 (1797,)) from scikit-learn."""
  from sklearn import datasets

  bunch = datasets.load_digits()
  return np.asarray(bunch.images, np.float64), np.asarray(bunch.target, np.int64)


def _png_bytes(array) -> bytes:
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


class ConvmaeDemoDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits, upscaled to 32x32 grey RGB (no download)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "1,797 digits: 1,437 train, 360 test (index % 5 == 0); 32x32 RGB PNG."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Offline labelled demo dataset: the 1,797 handwritten digits of "
            "sklearn.datasets.load_digits() (8x8, values 0..16), scaled to 0..255, upscaled to "
            f"{IMAGE_SIZE}x{IMAGE_SIZE} with PIL bicubic, grey replicated to RGB, stored as PNG. "
            f"Fixed split: test = rows with index % {TEST_EVERY} == 0 (360), train = the rest "
            f"(1,437).\nSource/license: {LICENSE}"),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8,
                                         encoding_format="png"),
            "label": tfds.features.ClassLabel(names=[str(k) for k in range(NUM_CLASSES)]),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        homepage=HOMEPAGE,
        citation=CITATION,
        metadata=tfds.core.MetadataDict(
            source="sklearn.datasets.load_digits (UCI Optical Recognition of Handwritten Digits, "
                   "test set optdigits.tes)",
            license=LICENSE,
            homepage=HOMEPAGE,
            doi="10.24432/C50P49",
            split_rule=f"test: index % {TEST_EVERY} == 0; train: the rest",
            preprocessing=("round(v*255/16) half up -> uint8; PIL bicubic 8->32; grey replicated "
                           "to 3 channels; PNG"),
        ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded: the digits ship with scikit-learn
    try:
      import sklearn  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
      raise FileNotFoundError(
          f"{NAME}: scikit-learn is not installed ({e}). Install the pinned version from "
          "requirements.txt.") from None
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    images, labels = load_digits()
    for i in range(len(labels)):
      if split_of(i) != split:
        continue
      yield i, {
          "image": io.BytesIO(_png_bytes(to_image(images[i]))),
          "label": int(labels[i]),
          "index": i,
      }
