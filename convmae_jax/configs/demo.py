r"""A tiny ConvMAE on the embedded photos: about a minute on a laptop CPU, no download.

    python main.py --config=configs/demo.py --workdir=/tmp/convmae_demo
    tensorboard --logdir=/tmp/convmae_demo

Expected result (measured on 2 CPU cores, about 50 s wall including the one-time build of the
dataset, about 520 img/s): the loss (pixel MSE on masked patches, ImageNet-normalized pixels) falls
from 1.07 (mean of steps 1-20) to 0.52 at step 500, and
/tmp/convmae_demo/reconstructions/step_000100.png ... step_000500.png show original | masked |
reconstruction | raw prediction of the 5 held-out photos, the masked patches turning from noise
into the right colours and shapes. The k-NN monitor (200 test digits against 200 train digits of
the embedded `convmae_demo_digits`, k = 20) printed top-1 39.0, 45.0, 56.5, 51.0 and 52.5% at
steps 100 ... 500, 0.7-1.1 s per evaluation (2.3 s for the first, which compiles); the randomly
initialised encoder scores 48.5%: 16 photos teach the tiny encoder little about digits.
"""

import ml_collections

from convmae_jax.configs import pretrain


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo config (``arg`` is ignored)."""
  del arg
  c = pretrain.get_config("tiny")
  c.dataset = "convmae_demo_photos"
  c.eval_split = "test"           # the 5 held-out photos
  c.image_size = 96               # 6x6 tokens of 16 px
  c.crop_scale = (0.2, 1.0)
  # Plain pixel loss: with 16 training photos the tiny model learns colours and shapes that show in
  # the figure; the recipe's normalized-pixel loss (configs/pretrain.py) also works here but its
  # figure borrows each patch's mean and variance from the original.
  c.norm_pix_loss = False
  c.dtype = "float32"             # bfloat16 is faster only on CPUs with AVX512-BF16 or AMX
  c.batch_size = 32
  c.num_train_steps = 500
  c.warmup_steps = 20
  c.blr = 2e-2                    # lr 2.5e-3 at batch 32: a tiny model trains fast at a high lr
  c.weight_decay = 0.05
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 2
  c.log_every_steps = 20
  c.recon_every_steps = 100
  c.recon_num_images = 5
  # k-NN monitor on the embedded digits (labelled, unlike the photos): 200 test digits against 200
  # train digits (20 of each class), every 100 steps.
  c.knn_every_steps = 100
  c.knn_dataset = "convmae_demo_digits"
  c.knn_reference_split = "train"
  c.knn_query_split = "test"
  c.knn_reference_per_class = 20
  c.knn_query_per_class = 20
  c.knn_batch_size = 64           # a multiple of batch_size: fits every mesh the demo fits
  return c
