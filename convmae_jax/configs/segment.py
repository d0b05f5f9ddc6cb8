r"""Semantic segmentation with UperNet on a pretrained ConvMAE encoder, the official ADE20K recipe
(ConvMAE ``SEG/configs/convmae/upernet_convmae_base_512_slide_160k_ade20k.py``, mmseg 0.11).

    python main.py --config=configs/segment.py --workdir=$HOME/runs/upernet_convmae_base \
      --config.init_from=$HOME/runs/convmae_base          # a pretraining workdir, or an official .pth

Expected result (Base, 1600-epoch pretraining, 160k iterations at global batch 16): 51.66 mIoU /
63.88 mAcc / 84.45 aAcc on ADE20K validation, single scale, sliding window (spec §5.2; README's
table says "16K" iterations, the config 160k). Not measured with this code (no ADE20K run yet).

Recipe: backbone ``convvit_seg_base`` (global attention in every stage-3 block with a per-block
relative-position table, layer scale 1.0, trainable position embedding resized from 14x14 to 32x32
at load, stride-32 map by an unpadded 3x3 stride-2 conv + BN + GELU), drop path 0.2; UPerHead
(channels 768, pool scales 1, 2, 3, 6) and an FCN auxiliary head on the stride-16 map (256
channels, loss weight 0.4), BatchNorm synchronised over the global batch, dropout 0.1; AdamW lr 1e-4
(absolute), betas (0.9, 0.999), weight decay 0.05 on every >= 2-D weight (pos_embed and relative-
position tables included, as the official rule works out), layer decay 0.75 over ids 0..12; poly
lr (power 1, min 0) with 1500 linear-warmup steps from 1e-6 x lr; 160k steps at batch 16; train
pipeline: random resize of (2048, 512) by 0.5-2.0, random crop 512 with cat_max_ratio 0.75, flip,
photometric distortion, reduce_zero_label (ADE's "other" ignored); test: resize into (2048, 512),
sliding windows of 512 every 341 pixels. Data: TFDS ``scene_parse150`` (image + ``annotation``).

Where this differs from mmseg (``data/segmentation.py``): evaluation runs at the test resolution
against the label map resized to it (mmseg resizes logits back to the original size), on a fixed
``eval_canvas`` into which larger images are shrunk; the photometric HSV steps use a float HSV
conversion. mmseg's apex fp16 is bfloat16 here (``dtype``; "auto" picks it where the hardware
computes in it).
"""

import ml_collections
from ml_collections.config_dict import placeholder

SIZES = ("tiny", "small", "base", "large", "huge")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Recipe config; ``arg`` is the model size (default "base")."""
  size = (arg or "base").strip()
  if size not in SIZES:
    raise ValueError(f"Unknown model size {size!r} in configs/segment.py:{size}; accepted: {SIZES}")
  c = ml_collections.ConfigDict()
  c.job = "segment"

  c.model = f"convvit_seg_{size}"  # the backbone; convvit_det_* is accepted too
  c.model_kwargs = ml_collections.ConfigDict({
      "embed_dims": placeholder(tuple), "depths": placeholder(tuple), "num_heads": placeholder(int),
      "mlp_ratios": placeholder(tuple), "patch_sizes": placeholder(tuple),
      "dwconv_impl": placeholder(str), "attention_impl": placeholder(str),
  })
  c.crop_size = 512               # training crop = the model's input side (pixels, multiple of 16)
  c.drop_path_rate = 0.2
  # Compute dtype: "auto" (bfloat16 on GPU/TPU and on CPUs with AVX512-BF16 or AMX, float32 on
  # other CPUs: train/precision.py) | "float32" | "bfloat16"; params, BN statistics and the loss
  # stay float32.
  c.dtype = "auto"
  c.remat = False                 # recompute backbone blocks in the backward pass (less memory)
  c.cpu_matmuls = "auto"          # XLA:CPU matrix products: "auto" | "ynnpack" | "eigen" (train/xla_cpu.py)
  c.host_malloc = "auto"          # reuse freed host memory on CPU: "auto" | "reuse" | "system" (host_malloc.py)
  c.init_from = ""                # pretraining workdir, model-only checkpoint or .pth; "" = random

  # Heads (mmseg UPerHead + FCNHead).
  c.num_classes = 150             # after reduce_zero_label; must equal the dataset's
  c.channels = 768                # UPerHead width
  c.pool_scales = (1, 2, 3, 6)    # PPM output sides
  c.aux_channels = 256            # FCNHead width; 0 = no auxiliary head
  c.aux_num_convs = 1
  c.aux_weight = 0.4
  c.dropout = 0.1                 # Dropout2d before both classifiers
  c.avg_non_ignore = False        # CE averaged over all pixels (mmseg 0.11), not labelled ones

  # Data.
  c.dataset = "scene_parse150"
  c.data_dir = ""                 # TFDS data_dir; "" = TFDS default
  c.mask_key = "annotation"       # the per-pixel label-map feature
  c.reduce_zero_label = True      # label 0 ignored, c -> c - 1
  c.train_split = "train"
  c.eval_split = "test"           # scene_parse150's "test" split is ADE20K validation (2,000)
  c.num_train_examples = -1
  c.train_scale = (2048, 512)     # (long, short) of the random resize, times a ratio in:
  c.ratio_range = (0.5, 2.0)
  c.cat_max_ratio = 0.75          # random crop: the largest class under this share (10 tries)
  c.hflip = True
  c.photometric = True
  c.test_scale = (2048, 512)      # evaluation resize (keep ratio)
  c.eval_canvas = (512, 2048)     # (H, W) every evaluation image is padded into
  c.eval_mode = "slide"           # "slide" | "whole" (whole: canvas = crop)
  c.eval_stride = (341, 341)
  c.prefetch = 2

  c.batch_size = 16               # global
  c.grad_accum_steps = 1
  c.num_epochs = 1                # unused: num_train_steps is set
  c.num_train_steps = 160_000
  c.warmup_epochs = 0
  c.warmup_steps = 1500
  c.lr = 1e-4                     # absolute peak lr (mmseg does not scale it with the batch)
  c.blr = 0.0                     # unused by this job
  c.min_lr = 0.0
  c.poly_power = 1.0
  c.warmup_ratio = 1e-6
  c.weight_decay = 0.05
  c.layer_decay = 0.75
  c.b1 = 0.9
  c.b2 = 0.999
  c.adam_eps = 1e-8
  c.seed = 0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.jax_distributed = False

  c.checkpoint_every_steps = 4000
  c.keep_checkpoints = 3
  c.keep_period = 0
  c.async_checkpointing = True
  c.log_every_steps = 50
  c.eval_every_steps = 16_000     # mmseg: evaluation every 16k iterations
  c.eval_batch_size = 8
  c.eval_num_examples = -1
  c.stop_after_steps = -1
  c.profile_steps = (0, 0)
  c.nonfinite = "stop"
  c.max_consecutive_skips = 10
  c.max_bad_fraction = 1.0
  c.peer_timeout_s = 120.0
  c.allow_resume_changes = False
  return c
