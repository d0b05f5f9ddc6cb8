r"""Semantic segmentation on the embedded demo (digits pasted on photos): a tiny UperNet that trains
and is scored in mIoU in a few minutes on 2 CPU cores, nothing to download.

    python main.py --config=configs/demo_digits.py --workdir=/tmp/convmae_digits    # pretrain first
    python main.py --config=configs/demo_segment.py --workdir=/tmp/convmae_seg \
      --config.init_from=/tmp/convmae_digits
    # the same recipe from random initialisation, for comparison:
    python main.py --config=configs/demo_segment.py --workdir=/tmp/convmae_seg_scratch

Data: TFDS ``convmae_demo_segments`` (600 train / 150 test 64x64 images, 11 classes: background
and the ten digits; built offline on first use). The official recipe (configs/segment.py) fitted to
64 px: crop 64, random resize of (256, 64) by 0.5-2.0, no reduce_zero_label (background is a
class), heads of 64 / 32 channels, lr 1e-3 with 50 warmup steps, 600 steps at batch 16; evaluation
by one 64-px window per image. Measured on the 150 test images: chance level so far (mIoU 8.43%,
every pixel predicted background; README, "Semantic segmentation", says why).
"""

import ml_collections

from convmae_jax.configs import segment


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo segmentation config (``arg`` is ignored)."""
  del arg
  c = segment.get_config("tiny")
  c.dataset = "convmae_demo_segments"
  c.train_split = "train"
  c.eval_split = "test"
  c.num_classes = 11
  c.reduce_zero_label = False
  c.crop_size = 64
  c.dtype = "float32"             # bfloat16 is no faster on CPUs
  c.drop_path_rate = 0.1
  c.channels = 64
  c.aux_channels = 32
  c.train_scale = (256, 64)
  c.test_scale = (256, 64)
  c.eval_canvas = (64, 64)
  c.eval_stride = (43, 43)
  c.batch_size = 16
  c.eval_batch_size = 50
  c.num_train_steps = 600
  c.warmup_steps = 50
  c.lr = 1e-3
  c.checkpoint_every_steps = 300
  c.keep_checkpoints = 2
  c.log_every_steps = 50
  c.eval_every_steps = 200
  return c
