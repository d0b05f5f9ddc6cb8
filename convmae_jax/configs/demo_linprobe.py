r"""Linear probing of the digits demo's tiny encoder on the embedded handwritten digits: about a
minute on a laptop CPU, nothing to download.

    python main.py --config=configs/demo_digits.py --workdir=/tmp/convmae_digits   # pretrain first
    python main.py --config=configs/demo_linprobe.py --workdir=/tmp/convmae_digits_lin \
      --config.init_from=/tmp/convmae_digits
    # a frozen random encoder, for comparison:
    python main.py --config=configs/demo_linprobe.py --workdir=/tmp/convmae_digits_lin_scratch

Frozen encoder, BatchNorm + linear head trained with LARS, as configs/linprobe.py, on 64 px digits
(``convmae_demo_digits``), with the digits' crops and no flip (configs/demo_finetune.py says why).
Expected top-1 on the 360 test digits: 93.3% from the digits pretraining demo, 74.4% with a frozen
random encoder (README, "On a laptop").
"""

import ml_collections

from convmae_jax.configs import linprobe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo linear-probe config (``arg`` is ignored)."""
  del arg
  c = linprobe.get_config("tiny")
  c.dataset = "convmae_demo_digits"
  c.eval_split = "test"
  c.num_classes = 10
  c.image_size = 64
  c.global_pool = True            # mean of the 16 tokens: token 0 alone sees one corner of a digit
  c.dtype = "float32"
  c.batch_size = 128
  c.eval_batch_size = 120
  c.num_train_steps = 300
  c.warmup_steps = 30
  # LARS moves each weight by about lr * 0.001 of its norm per step: the recipe's lr (1.6 at 4096)
  # is made for ~28k steps; 300 steps need a far larger one.
  c.blr = 128.0                   # lr 64 at batch 128
  c.crop_scale = (0.5, 1.0)       # digits fill the frame: smaller crops cut them off
  c.hflip = False                 # a mirrored 2, 3 or 7 is not a digit
  c.checkpoint_every_steps = 300
  c.keep_checkpoints = 1
  c.log_every_steps = 50
  c.eval_every_steps = 100
  return c
