r"""FastConvMAE pretraining on ImageNet-1k: complementary masks, the published recipe.

    python main.py --config=configs/fastconvmae.py --workdir=/path/to/workdir       # ConvMAE-Base
    python main.py --config=configs/fastconvmae.py:small --workdir=...               # another size

FastConvMAE (Alpha-VL/FastConvMAE PRETRAIN.md) trains the ConvMAE-Base model with complementary
masks: each image's 196 shuffled tokens are split into four disjoint groups of 49 visible tokens
that cover the image once; the conv stages compute every position once, in its own group, stage 3
and the decoder run on each group, and the loss is the mean of the four groups' losses. Every image
therefore trains all of its patches as targets in one step, which is why 50 epochs suffice.

Recipe: 50 epochs, 10 warmup epochs, blr 6e-4 (lr = blr · 512 / 256), global batch 512
(1 node × 8 GPUs × 64), AdamW (0.9, 0.95) with weight decay 0.05, normalized-pixel loss, mask
ratio 0.75. Expected result (FastConvMAE README, RGB targets, 50 epochs): 84.4% ImageNet-1k top-1
after fine-tuning (configs/finetune.py). The README's "C+T" teacher targets are not in the released
code and not here. Any mask ratio whose 1/(1 − ratio) is an integer works (0.5 → 2 groups,
0.8 → 5); the token count must be a multiple of the group count.

Every field of configs/pretrain.py can be overridden the same way, e.g. --config.batch_size=1024.
"""

import ml_collections

from convmae_jax.configs import pretrain


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The FastConvMAE recipe; ``arg`` is the model size (default "base")."""
  c = pretrain.get_config(arg)
  c.complementary_masks = True
  c.mask_ratio = 0.75
  c.norm_pix_loss = True
  c.batch_size = 512
  c.num_epochs = 50
  c.warmup_epochs = 10
  c.blr = 6e-4
  c.weight_decay = 0.05
  c.b1, c.b2 = 0.9, 0.95
  c.checkpoint_every_steps = 2500   # about every 1 epoch at batch 512
  return c
