"""Prepares a TFDS dataset for training, with the project's pinned packages only.

    python -m convmae_jax.data prepare imagenet2012 --data_dir ~/tensorflow_datasets \
        --manual_dir ~/tensorflow_datasets/downloads/manual

``tfds build`` (the TFDS command line) imports Apache Beam, which the project does not install;
this calls the same builder's ``download_and_prepare`` in this process instead. For ImageNet the
manual dir must hold ``ILSVRC2012_img_train.tar`` (a tar of one tar per synset) and
``ILSVRC2012_img_val.tar``, unextracted, as image-net.org serves them; both are checked before
anything is written. Exit status 2 with one line on stderr for a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys

# What ImageNet's TFDS builder reads from the manual dir (the test split's tar is optional).
IMAGENET_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


class UsageError(Exception):
  pass


def check_manual_dir(name: str, manual_dir: str | None) -> None:
  """Raises UsageError naming what is missing when ``name`` needs files that are not there."""
  if not name.split(":")[0].startswith("imagenet2012"):
    return
  if not manual_dir:
    raise UsageError(f"{name} needs --manual_dir: the folder with {' and '.join(IMAGENET_FILES)} "
                     "from https://image-net.org/ (unextracted)")
  if not os.path.isdir(manual_dir):
    raise UsageError(f"--manual_dir {manual_dir} is not a folder")
  missing = [f for f in IMAGENET_FILES if not os.path.isfile(os.path.join(manual_dir, f))]
  if missing:
    raise UsageError(f"--manual_dir {manual_dir} lacks {', '.join(missing)} (ImageNet needs "
                     f"{' and '.join(IMAGENET_FILES)}, unextracted, as image-net.org serves them)")


def prepare(name: str, *, data_dir: str | None = None, manual_dir: str | None = None):
  """Builds ``name`` into ``data_dir`` (TFDS's default when None); returns the TFDS builder."""
  import tensorflow_datasets as tfds

  from convmae_jax import data  # registers the embedded demo datasets

  del data
  manual_dir = os.path.expanduser(manual_dir) if manual_dir else None
  check_manual_dir(name, manual_dir)
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001 -- TFDS raises several types for an unknown name
    raise UsageError(f"no TFDS dataset {name!r}: {str(e).splitlines()[0]}") from e
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m convmae_jax.data", description=__doc__.split("\n\n")[0])
  sub = ap.add_subparsers(dest="command", required=True)
  p = sub.add_parser("prepare", help="download (where TFDS can) and write a dataset's TFRecords")
  p.add_argument("name", help="TFDS name, e.g. imagenet2012 or imagenet2012:5.1.0")
  p.add_argument("--data_dir", default=None,
                 help="where the TFRecords go (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  p.add_argument("--manual_dir", default=None,
                 help="folder with manually downloaded files (ImageNet's tars)")
  args = ap.parse_args(argv)
  try:
    builder = prepare(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  splits = ", ".join(f"{k} {v.num_examples}" for k, v in sorted(builder.info.splits.items()))
  print(f"{builder.name} {builder.version} prepared in {builder.data_dir} ({splits} examples)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
