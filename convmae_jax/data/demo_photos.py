"""`convmae_demo_photos`: an offline TFDS dataset made of the real photos pip packages ship.

The photos come from scikit-image (`skimage/data`), scikit-learn (`sklearn/datasets/images`) and
matplotlib (`mpl-data/sample_data`), which are normal dependencies of this project. Nothing is
downloaded: `_split_generators` ignores the download manager and reads the files from the
installed packages (found with `importlib.util.find_spec`, without importing them).

Every photo is converted to RGB (grey photos are replicated to 3 channels), resized so that its short
side is 256 pixels (Lanczos) and stored as JPEG. Preparing the dataset takes about a second and it
is cached in the TFDS `data_dir` like any other TFDS dataset.

Splits:
  * ``train``: 16 photos;
  * ``test``: 5 fixed held-out photos (cat, coffee, astronaut, rocket, flower), used for the
    reconstruction figures.

Features: ``image`` (uint8, (None, None, 3)), ``label`` (ClassLabel with one class, ``photo``),
``file_name`` (``<package>/<path inside the package>``).

`PHOTOS` is the manifest (package, file, license, attribution, split); it is also stored in the
prepared dataset's ``metadata.json``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os

import numpy as np
import tensorflow_datasets as tfds

NAME = "convmae_demo_photos"
SHORT_SIDE = 256
JPEG_QUALITY = 95


@dataclasses.dataclass(frozen=True)
class Photo:
  key: str
  module: str        # importable top-level module that ships the file
  package: str       # pip distribution name
  path: str          # path inside the module's directory
  split: str         # "train" or "test"
  license: str
  attribution: str


_SK = ("skimage", "scikit-image")
_SL = ("sklearn", "scikit-learn")
_MPL = ("matplotlib", "matplotlib")


def _p(key, mod, path, split, lic, attribution):
  return Photo(key=key, module=mod[0], package=mod[1], path=path, split=split, license=lic,
               attribution=attribution)


# Held-out photos first (test split), then the training photos.
PHOTOS: tuple[Photo, ...] = (
    _p("chelsea", _SK, "data/chelsea.png", "test", "CC0",
       "Chelsea the cat; photo by Stefan van der Walt"),
    _p("coffee", _SK, "data/coffee.png", "test", "CC0",
       "Coffee cup; photo by Rachel Michetti, courtesy of Pikolo Espresso Bar"),
    _p("astronaut", _SK, "data/astronaut.png", "test", "Public domain",
       "Eileen Collins; NASA Great Images database"),
    _p("rocket", _SK, "data/rocket.jpg", "test", "Public domain",
       "Falcon 9 / DSCOVR launch; SpaceX photos"),
    _p("flower", _SL, "datasets/images/flower.jpg", "test", "CC-BY-2.0",
       "flickr user vultilion (https://www.flickr.com/photos/vultilion/6056698931)"),
    _p("china", _SL, "datasets/images/china.jpg", "train", "CC-BY-2.0",
       "flickr user danielbuechele (https://www.flickr.com/photos/danielbuechele/6061409035)"),
    _p("grace_hopper", _MPL, "mpl-data/sample_data/grace_hopper.jpg", "train", "Public domain",
       "Grace Hopper; US Navy photo"),
    _p("hubble_deep_field", _SK, "data/hubble_deep_field.jpg", "train", "Public domain",
       "Hubble eXtreme Deep Field; NASA"),
    _p("retina", _SK, "data/retina.jpg", "train", "CC0",
       "Fundus photograph of normal left eye; Mikael Haggstrom (Wikimedia Commons)"),
    _p("ihc", _SK, "data/ihc.png", "train", "No known copyright restrictions",
       "Immunohistochemistry; Center for Microscopy and Molecular Imaging (CMMI)"),
    _p("motorcycle_left", _SK, "data/motorcycle_left.png", "train",
       "No license stated (ships in scikit-image, BSD-3-Clause package)",
       "Middlebury 2014 stereo benchmark (Scharstein et al.)"),
    _p("motorcycle_right", _SK, "data/motorcycle_right.png", "train",
       "No license stated (ships in scikit-image, BSD-3-Clause package)",
       "Middlebury 2014 stereo benchmark (Scharstein et al.)"),
    _p("camera", _SK, "data/camera.png", "train", "CC0", "Cameraman; photo by Lav Varshney"),
    _p("clock", _SK, "data/clock_motion.png", "train", "Public domain",
       "Motion-blurred clock; photo by Stefan van der Walt"),
    _p("coins", _SK, "data/coins.png", "train", "No known copyright restrictions",
       "Greek coins; Brooklyn Museum collection"),
    _p("moon", _SK, "data/moon.png", "train",
       "No license stated (ships in scikit-image, BSD-3-Clause package)", "Surface of the moon"),
    _p("brick", _SK, "data/brick.png", "train", "CC0", "Bricks25; CC0Textures"),
    _p("grass", _SK, "data/grass.png", "train", "CC0", "Grass-01; linolafett (DeviantArt)"),
    _p("gravel", _SK, "data/gravel.png", "train", "CC0", "Gravel04; CC0Textures"),
    _p("cell", _SK, "data/cell.png", "train", "CC0",
       "Cell floating in saline (quantitative phase image); Mueller et al., Optics Express 2018"),
    _p("text", _SK, "data/text.png", "train", "Public domain",
       "Handwritten text (Wikipedia File:Corner.png)"),
)

SPLITS = ("train", "test")


def _module_dir(module: str) -> str | None:
  """Directory of an installed top-level package, found without importing it."""
  try:
    spec = importlib.util.find_spec(module)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  return list(spec.submodule_search_locations)[0]


def photo_path(photo: Photo) -> str | None:
  """Absolute path of a manifest photo, or None when its package/file is not installed."""
  root = _module_dir(photo.module)
  if root is None:
    return None
  path = os.path.join(root, *photo.path.split("/"))
  return path if os.path.isfile(path) else None


def manifest() -> list[dict]:
  """The manifest as JSON-able dicts (also stored in the prepared dataset's metadata.json)."""
  return [dataclasses.asdict(p) for p in PHOTOS]


def load_photo(path: str, short_side: int = SHORT_SIDE):
  """Reads one photo as RGB uint8 (grey replicated), resized to `short_side` on the short side."""
  from PIL import Image

  with Image.open(path) as im:
    im = im.convert("RGB")
    w, h = im.size
    scale = short_side / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
      im = im.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


def _jpeg_bytes(array) -> bytes:
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="JPEG", quality=JPEG_QUALITY)
  return buf.getvalue()


class ConvmaeDemoPhotos(tfds.core.GeneratorBasedBuilder):
  """Real photos shipped by scikit-image, scikit-learn and matplotlib (no download)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "21 photos: 16 train, 5 test; short side 256."}

  def _info(self) -> tfds.core.DatasetInfo:
    lines = [f"  {p.split:5s} {p.package}/{p.path} [{p.license}] {p.attribution}" for p in PHOTOS]
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Offline demo dataset for ConvMAE pretraining: real photos that pip packages ship, "
            f"converted to RGB and resized to short side {SHORT_SIDE}.\n" + "\n".join(lines)),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8,
                                         encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=["photo"]),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-image.org/docs/stable/api/skimage.data.html",
        metadata=tfds.core.MetadataDict(photos=manifest()),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    missing = [f"{p.package}/{p.path}" for p in PHOTOS if photo_path(p) is None]
    if missing:
      raise FileNotFoundError(
          f"{NAME}: these photos were not found in the installed packages: {missing}. "
          "Install the pinned versions from requirements.txt "
          "(scikit-image, scikit-learn, matplotlib).")
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    for p in PHOTOS:
      if p.split != split:
        continue
      yield p.key, {
          "image": io.BytesIO(_jpeg_bytes(load_photo(photo_path(p)))),
          "label": 0,
          "file_name": f"{p.module}/{p.path}",
      }
