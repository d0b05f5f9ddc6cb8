"""Input throughput with and without the guarded decode (pipeline.decode_guarded) on the demo photos.

    python benchmarks/decode_guard.py [--size 224] [--batch 32] [--batches 30]

Runs the same stream (RandomResizedCrop + resize + normalise) through a plain parallel map and
through the guard that replaces undecodable records, alternating twice, and prints img/s of each.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

from convmae_jax.data import pipeline as P  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=30)
  args = parser.parse_args()
  builder = P.check_dataset(P.DEMO_DATASET, split="train")
  stream, _ = P.example_stream(builder, P.DEMO_DATASET, "train", image_key="image", label_key=None,
                               seed=0, process_index=0, process_count=1, local_batch=args.batch,
                               start_step=0, shuffle_buffer=16)
  key = P.augment_seed(0, 0)

  def transform(index, image_bytes):
    k = P._example_seed(key, index)
    crop = P._decode_and_crop(image_bytes, lambda h, w: P._random_resized_crop_box(
        h, w, k, (0.2, 1.0), P.DEFAULT_RATIO))
    return {"image": P._resize_normalize(crop, args.size)}

  plain = stream.map(lambda i, b, _id: transform(i, b), num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=True)
  guarded = P.decode_guarded(stream, transform,
                             lambda i, b: {"image": P.replacement_image(args.size)})
  for name, ds in (("plain", plain), ("guarded", guarded)) * 2:
    it = P.finish(ds, args.batch, 2, None).as_numpy_iterator()
    next(it)
    start = time.perf_counter()
    for _ in range(args.batches):
      next(it)
    print(f"{name}: {args.batches * args.batch / (time.perf_counter() - start):.0f} img/s",
          flush=True)


if __name__ == "__main__":
  main()
