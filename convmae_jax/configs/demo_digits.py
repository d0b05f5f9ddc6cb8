r"""A tiny ConvMAE pretrained on the embedded handwritten digits, their labels unused: a few minutes
on a laptop CPU, nothing to download. The k-NN monitor (labels used only there) shows the encoder
learning the digits while it reconstructs them.

    python main.py --config=configs/demo_digits.py --workdir=/tmp/convmae_digits
    tensorboard --logdir=/tmp/convmae_digits

Then fine-tune or linear-probe from it (configs/demo_finetune.py, configs/demo_linprobe.py):

    python main.py --config=configs/demo_finetune.py --workdir=/tmp/convmae_digits_ft \
      --config.init_from=/tmp/convmae_digits
    python main.py --config=configs/demo_linprobe.py --workdir=/tmp/convmae_digits_lin \
      --config.init_from=/tmp/convmae_digits

Fitted to the data (the ImageNet recipe, configs/pretrain.py, stays official):
- 64 px: the 8x8 digits (stored at 32 px) fed at 64 px give 4x4 tokens of 16 px, 2x2 of the
  original pixels each; at 75% masking the encoder sees 4 of the 16.
- No horizontal flip: a mirrored 2, 3 or 7 is not a digit; crops keep most of the digit
  (``crop_scale``), since a digit fills its frame.
- A high lr for a tiny model and a short run (as configs/demo.py).

Expected result (measured on 2 AMD EPYC cores shared with other work: 4 min 36 s wall, 500-630
img/s): the loss (normalized pixels of the masked patches) falls from 0.86 at step 100 to 0.35 at
step 2000, and the k-NN top-1 of the 360 test digits against the 1,437 train digits rises from
60.3% (the random initial encoder) to 62.2, 78.9, 84.7, 88.1% at steps 250, 500, 750, 1000 and
88.6% at step 2000. Fine-tuned from it (configs/demo_finetune.py): 98.3% top-1; linear probe
(configs/demo_linprobe.py): 93.3% (README, "On a laptop").
"""

import ml_collections

from convmae_jax.configs import pretrain


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The digits pretraining demo config (``arg`` is ignored)."""
  del arg
  c = pretrain.get_config("tiny")
  c.dataset = "convmae_demo_digits"   # images only: the pretraining job never reads the labels
  c.train_split = "train"             # 1,437 digits
  c.eval_split = "test"               # the reconstruction figure: held-out digits
  c.image_size = 64
  c.crop_scale = (0.5, 1.0)
  c.hflip = False
  c.dtype = "float32"                 # bfloat16 is faster only on CPUs with AVX512-BF16 or AMX
  c.batch_size = 64
  c.num_train_steps = 2000
  c.warmup_steps = 100
  c.blr = 1e-2                        # lr 2.5e-3 at batch 64
  c.weight_decay = 0.05
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.log_every_steps = 100
  c.recon_every_steps = 500
  c.recon_num_images = 8
  # k-NN on the digits themselves: all 360 test digits against all 1,437 train digits.
  c.knn_every_steps = 250
  c.knn_dataset = "convmae_demo_digits"
  c.knn_reference_split = "train"
  c.knn_query_split = "test"
  c.knn_reference_per_class = 1000     # more than any class has: the whole split
  c.knn_query_per_class = 1000
  c.knn_batch_size = 128
  return c
