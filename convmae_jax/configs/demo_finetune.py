r"""Fine-tuning the demo's tiny encoder on the embedded handwritten digits: a few minutes on a laptop
CPU, nothing to download.

    python main.py --config=configs/demo.py --workdir=/tmp/convmae_demo            # pretrain first
    python main.py --config=configs/demo_finetune.py --workdir=/tmp/convmae_demo_ft \
      --config.init_from=/tmp/convmae_demo
    # the same from random initialisation, for comparison:
    python main.py --config=configs/demo_finetune.py --workdir=/tmp/convmae_demo_ft_scratch

The digits (scikit-learn's 1,797 8x8 digits, TFDS ``convmae_demo_digits``: 1,437 train / 360 test,
built offline on first use) are fed at 64 px, so the encoder pretrained at 96 px (6x6 tokens) gets
its position embedding resized to 4x4 tokens. The recipe is the official one (layer decay,
mixup/cutmix, RandAugment, random erasing, drop path) at a small batch and a higher lr. Measured
top-1 on the 360 test digits is in README ("Fine-tuning and linear probing").
"""

import ml_collections

from convmae_jax.configs import finetune


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo fine-tuning config (``arg`` is ignored)."""
  del arg
  c = finetune.get_config("tiny")
  c.dataset = "convmae_demo_digits"
  c.eval_split = "test"
  c.num_classes = 10
  c.image_size = 64
  c.dtype = "float32"             # bfloat16 is no faster on CPUs
  c.batch_size = 64
  c.eval_batch_size = 120
  c.num_train_steps = 400
  c.warmup_steps = 40
  c.blr = 4e-3                    # lr 1e-3 at batch 64
  c.layer_decay = 0.75
  c.crop_scale = (0.35, 1.0)      # digits fill the frame: smaller crops cut them off
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 2
  c.log_every_steps = 50
  c.eval_every_steps = 100
  return c
