"""The pretraining input pipeline's own rate: images/s per host core, on ImageNet-sized JPEGs.

    python benchmarks/input_pipeline.py                       # threads 1 and 2, 224 px
    python benchmarks/input_pipeline.py --threads 1,4,8 --img_size 224 --examples 2000

Builds (once, in ``--data_dir``) a TFDS dataset of ``--examples`` JPEGs shaped like ImageNet's
training images: crops of real photos (the ones the demo dataset uses, at full resolution) with
ImageNet's typical sizes (long side 500, short side 333-500, sometimes portrait), JPEG quality 90.
Then it runs the trainer's own pipeline (`convmae_jax.data.pipeline.create_pretrain_dataset`:
TFDS read, per-epoch shuffle, decode-and-crop JPEG, RandomResizedCrop(0.2, 1) bicubic resize,
flip, normalize, batch) with a private tf.data pool of T threads and reports, per T, one JSON line:
images/s and images/s per thread, after a warm-up of two batches.

Divide an accelerator's pretraining images/s by the per-core rate to know how many host cores
feed it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from benchmarks import hostinfo  # noqa: E402
from convmae_jax.data import demo_photos, pipeline  # noqa: E402

NAME = "convmae_bench_jpegs"
# ImageNet-1k train: most images are 500 px on the long side; 333 and 375 are the common short sides.
SHORT_SIDES = (333, 375, 400, 500)
JPEG_QUALITY = 90


def _sources():
  out = []
  for p in demo_photos.PHOTOS:
    path = demo_photos.photo_path(p)
    if path is not None:
      out.append(demo_photos.load_photo(path, short_side=512))
  if not out:
    raise SystemExit("error: none of the demo photos were found (install requirements.txt)")
  return out


def imagenet_like_jpegs(n: int, seed: int = 0):
  """n JPEG byte strings: random crops of real photos resized to ImageNet's usual sizes."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  photos = _sources()
  for i in range(n):
    src = photos[i % len(photos)]
    short = int(rng.choice(SHORT_SIDES))
    w, h = (500, short) if rng.random() < 0.8 else (short, 500)
    # A random window of the photo with the target aspect ratio, then resized to (w, h).
    H, W = src.shape[:2]
    scale = rng.uniform(0.6, 1.0)
    cw = min(W, int(round(min(W, H * w / h) * scale)))
    ch = min(H, int(round(cw * h / w)))
    y = int(rng.integers(0, H - ch + 1))
    x = int(rng.integers(0, W - cw + 1))
    im = Image.fromarray(src[y:y + ch, x:x + cw]).resize((w, h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    yield buf.getvalue()


class ConvmaeBenchJpegs(tfds.core.GeneratorBasedBuilder):
  """ImageNet-sized JPEGs for the input-pipeline benchmark (generated from the demo photos)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = []
  NUM_EXAMPLES = 1000

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description="ImageNet-sized JPEG crops of the demo photos (benchmark only).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8,
                                         encoding_format="jpeg")}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, data in enumerate(imagenet_like_jpegs(self.NUM_EXAMPLES)):
      # Stored as given: the Image feature re-encodes arrays, not bytes.
      yield i, {"image": io.BytesIO(data)}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--threads", default="1,2", help="comma list of tf.data pool sizes")
  ap.add_argument("--img_size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--batches", type=int, default=12, help="timed batches per thread count")
  ap.add_argument("--repeats", type=int, default=3, help="timings per thread count (median)")
  ap.add_argument("--examples", type=int, default=1000)
  ap.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "convmae_bench_tfds"))
  args = ap.parse_args(argv)
  try:
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
  except ValueError:
    ap.error(f"--threads {args.threads!r}: expected a comma list of integers >= 1")
  if not threads or min(threads) < 1:
    ap.error(f"--threads {args.threads!r}: expected a comma list of integers >= 1")
  if min(args.img_size, args.batch, args.batches, args.repeats, args.examples) < 1:
    ap.error("--img_size, --batch, --batches, --repeats and --examples must be >= 1")

  ConvmaeBenchJpegs.NUM_EXAMPLES = args.examples
  data_dir = os.path.join(args.data_dir, f"n{args.examples}")
  builder = tfds.builder(NAME, data_dir=data_dir)
  if not builder.is_prepared():
    t0 = time.perf_counter()
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
    print(f"prepared {args.examples} JPEGs in {time.perf_counter() - t0:.1f} s ({data_dir})",
          file=sys.stderr, flush=True)
  sizes = [len(b) for b in imagenet_like_jpegs(min(args.examples, 200))]

  for t in threads:
    it = pipeline.create_pretrain_dataset(
        NAME, split="train", global_batch_size=args.batch, image_size=args.img_size, seed=0,
        process_index=0, process_count=1, data_dir=data_dir, threads=t, prefetch=2,
        shuffle_buffer=min(args.examples, 1024))
    for _ in range(2):
      next(it)
    rates = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      for _ in range(args.batches):
        batch = next(it)
      rates.append(args.batch * args.batches / (time.perf_counter() - t0))
    assert batch["image"].shape == (args.batch, args.img_size, args.img_size, 3)
    ips = statistics.median(rates)
    print(json.dumps(dict(threads=t, img_size=args.img_size, batch=args.batch,
                          images_per_s=round(ips, 1), images_per_s_per_thread=round(ips / t, 1),
                          all_images_per_s=[round(r, 1) for r in rates],
                          mean_jpeg_kb=round(statistics.mean(sizes) / 1024, 1),
                          host_cores=os.cpu_count(), cpu=hostinfo.cpu_name())),
          flush=True)


if __name__ == "__main__":
  main()
