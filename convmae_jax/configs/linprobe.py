r"""Linear probing of a pretrained ConvMAE encoder on ImageNet-1k, the official recipe
(ConvMAE FINETUNE.md, main_linprobe.py, util/lars.py, util/crop.py).

    python main.py --config=configs/linprobe.py --workdir=$HOME/runs/convvit_base_lin \
      --config.init_from=$HOME/runs/convmae_base

Expected result (Base, 1600-epoch pretraining): 70.9% top-1 on ImageNet-1k validation.

Recipe: the encoder is frozen (and runs in the compute dtype, bfloat16 on accelerators; no gradient
reaches it), BatchNorm without affine (eps 1e-6; batch statistics in training, running ones in
evaluation) + a linear head initialised N(0, 0.01), trained with LARS (momentum 0.9, trust
coefficient 0.001, no weight decay), lr = 0.1 * batch / 256 (1.6 at 4096), 10 warmup epochs then a
half-cosine, 90 epochs, global batch 4096; one RandomResizedCrop draw (scale 0.08-1, no retry loop,
bicubic) + flip; evaluation resize 256 + center crop 224; plain cross entropy.

``global_pool`` defaults to False as in main_linprobe.py, whose quirk is that the feature is then
token 0 after the pretrained final norm: there is no class token, so that is the top-left patch
token. The multi-node command of FINETUNE.md passes --global_pool (mean of the tokens, a fresh
frozen fc_norm, then BatchNorm): ``--config.global_pool=True``.
"""

import ml_collections

from convmae_jax.configs import finetune


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Recipe config; ``arg`` is the model size (default "base")."""
  c = finetune.get_config(arg)
  c.job = "linprobe"
  c.global_pool = False           # official main_linprobe default: token 0 after the pretrained norm
  c.drop_path_rate = 0.0
  c.head_init_std = 0.01          # head N(0, 0.01), bias 0
  c.crop_scale = (0.08, 1.0)      # one draw, TF/BYOL style (util/crop.py)
  c.rand_augment = ""
  c.reprob = 0.0
  c.mixup = 0.0
  c.cutmix = 0.0
  c.mixup_prob = 0.0
  c.label_smoothing = 0.0
  c.batch_size = 4096
  c.num_epochs = 90
  c.warmup_epochs = 10
  c.blr = 0.1
  c.min_lr = 0.0
  c.weight_decay = 0.0
  c.momentum = 0.9                # LARS momentum
  c.eval_every_steps = 312        # about one epoch at batch 4096
  return c
