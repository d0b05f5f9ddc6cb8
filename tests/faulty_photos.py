"""`faulty_photos`: a 16-image TFDS dataset (JPEG records) in which 3 records cannot be decoded,
for the bad-record tests. Importing this module registers the builder; `prepare(data_dir)` writes
it (a fraction of a second).

Records (by generator key): 3 and 9 are JPEGs cut 30 bytes into their entropy-coded data (headers
intact, so their size is readable, but no crop of them decodes), 12 holds bytes that are no image.
"""

import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NAME = "faulty_photos"
NUM_EXAMPLES = 16
TRUNCATED = (3, 9)
NOT_AN_IMAGE = (12,)
NUM_BAD = len(TRUNCATED) + len(NOT_AN_IMAGE)


def _photo(i: int, size: int = 48) -> bytes:
  y, x = np.mgrid[0:size, 0:size]
  a = np.stack([(x * (i + 3)) % 256, (y * (i + 5)) % 256, ((x + y) * 7 + 31 * i) % 256], -1)
  buf = io.BytesIO()
  Image.fromarray(a.astype(np.uint8)).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _truncated(jpeg: bytes) -> bytes:
  return jpeg[:jpeg.index(b"\xff\xda") + 30]     # 30 bytes past the start-of-scan marker


class FaultyPhotos(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(NUM_EXAMPLES):
      record = _photo(i)
      if i in TRUNCATED:
        record = _truncated(record)
      elif i in NOT_AN_IMAGE:
        record = b"this record holds no image"
      yield i, {"image": record}


def prepare(data_dir) -> str:
  data_dir = os.fspath(data_dir)
  builder = FaultyPhotos(data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare()
  return data_dir
