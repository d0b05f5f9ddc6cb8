r"""Fine-tuning the digits demo's tiny encoder on the embedded handwritten digits: under two minutes
on a laptop CPU, nothing to download.

    python main.py --config=configs/demo_digits.py --workdir=/tmp/convmae_digits   # pretrain first
    python main.py --config=configs/demo_finetune.py --workdir=/tmp/convmae_digits_ft \
      --config.init_from=/tmp/convmae_digits
    # the same recipe from random initialisation, for comparison:
    python main.py --config=configs/demo_finetune.py --workdir=/tmp/convmae_digits_ft_scratch

Any pretraining workdir works as ``init_from`` (the photos demo's too: its 96-px position
embedding is resized to the 4x4 tokens of 64 px). The digits (scikit-learn's 1,797 8x8 digits,
TFDS ``convmae_demo_digits``: 1,437 train / 360 test, built offline on first use) are fed at 64 px.

Fitted to 8x8 digits (the ImageNet recipe, configs/finetune.py, stays official): crops that keep
most of the digit, no horizontal flip, no RandAugment / random erasing / mixup / cutmix (they slow
a 250-step run on small grey digits more than they help), layer decay 0.75, label smoothing and
drop path as the recipe. Expected top-1 on the 360 test digits: 98.3% from the digits pretraining
demo, 91.7% from random initialisation (README, "On a laptop").
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
  c.dtype = "float32"             # bfloat16 is faster only on CPUs with AVX512-BF16 or AMX
  c.batch_size = 64
  c.eval_batch_size = 120
  c.num_train_steps = 250
  c.warmup_steps = 25
  c.blr = 4e-3                    # lr 1e-3 at batch 64
  c.layer_decay = 0.75
  c.crop_scale = (0.5, 1.0)       # digits fill the frame: smaller crops cut them off
  c.hflip = False                 # a mirrored 2, 3 or 7 is not a digit
  # ImageNet's regularisers (RandAugment, random erasing, mixup/cutmix) make 250 steps on 1,437
  # small grey digits learn slowly; label smoothing and drop path stay.
  c.rand_augment = ""
  c.reprob = 0.0
  c.mixup = 0.0
  c.cutmix = 0.0
  c.mixup_prob = 0.0
  c.checkpoint_every_steps = 250
  c.keep_checkpoints = 2
  c.log_every_steps = 50
  c.eval_every_steps = 50
  return c
