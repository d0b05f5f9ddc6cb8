r"""Fine-tuning a pretrained ConvMAE encoder (ConvViT) on ImageNet-1k, the official recipe
(ConvMAE FINETUNE.md, main_finetune.py).

    python main.py --config=configs/finetune.py --workdir=$HOME/runs/convvit_base_ft \
      --config.init_from=$HOME/runs/convmae_base          # a pretraining workdir, or
      # --config.init_from=weights/convmae_base           # `python -m convmae_jax.interop import`
      # --config.init_from=convmae_base.pth               # an official pretraining checkpoint

Expected result (Base, 1600-epoch pretraining, 100 epochs here at global batch 1024): 85.0% top-1
on ImageNet-1k validation (official log: 84.982 / 97.152, loss 0.695); 84.4% after a 200-epoch
pretraining. ``configs/finetune.py:large`` picks another size (tiny, small, base, large, huge).

Recipe: AdamW (0.9, 0.999), lr = 5e-4 * batch / 256 (2e-3 at 1024), 5 warmup epochs then a
half-cosine per step to 1e-6, weight decay 0.05 on every >= 2-D weight except the position
embedding (biases and norms undecayed), layer-wise lr decay 0.65 (conv stages, patch embeddings and
the position embedding share the lowest scale 0.65^12), drop path 0.1, mixup 0.8 / cutmix 1.0 /
switch 0.5 / label smoothing 0.1 with soft-target cross entropy, RandAugment rand-m9-mstd0.5-inc1,
random erasing 0.25, RandomResizedCrop(224, scale 0.08-1, bicubic) + flip; evaluation resize 256
(bicubic) + center crop 224. The head is re-initialised N(0, 2e-5); the position embedding trains
and is resized (bicubic) when fine-tuning at another resolution than pretraining.
"""

import ml_collections
from ml_collections.config_dict import placeholder

SIZES = ("tiny", "small", "base", "large", "huge")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Recipe config; ``arg`` is the model size (default "base")."""
  size = (arg or "base").strip()
  if size not in SIZES:
    raise ValueError(f"Unknown model size {size!r} in configs/finetune.py:{size}; accepted: {SIZES}")
  c = ml_collections.ConfigDict()
  c.job = "finetune"              # pretrain | finetune | linprobe | evaluate

  # Model: a ConvViT classifier; the encoder comes from init_from.
  c.model = f"convvit_{size}"
  # Model-size overrides; None = the size table's value (they must match the checkpoint).
  c.model_kwargs = ml_collections.ConfigDict({
      "embed_dims": placeholder(tuple), "depths": placeholder(tuple), "num_heads": placeholder(int),
      "mlp_ratios": placeholder(tuple), "patch_sizes": placeholder(tuple),
      "dwconv_impl": placeholder(str),   # "auto" (default) | "shift" | "lax": same function
      "attention_impl": placeholder(str),  # "auto" (default) | "explicit" | "xla" | "cudnn"
  })
  c.image_size = 224              # pixels; a multiple of 16 (pos_embed resized if it differs)
  c.num_classes = 1000            # must equal the dataset's number of classes
  c.global_pool = True            # mean of the stage-3 tokens -> fc_norm -> head (official default)
  c.drop_path_rate = 0.1          # stochastic depth, linear over all 15 blocks
  # Compute dtype: "auto" (bfloat16 on GPU/TPU and on CPUs with AVX512-BF16 or AMX, float32 on
  # other CPUs: train/precision.py) | "float32" | "bfloat16"; parameters stay float32.
  c.dtype = "auto"
  c.remat = False                 # recompute activations in the backward pass (less memory)
  c.cpu_matmuls = "auto"          # XLA:CPU matrix products: "auto" | "ynnpack" | "eigen" (train/xla_cpu.py)
  c.host_malloc = "auto"          # reuse freed host memory on CPU: "auto" | "reuse" | "system" (host_malloc.py)
  c.init_from = ""                # pretraining workdir, model-only checkpoint or .pth/.safetensors
  c.head_init_std = 2e-5          # head re-initialised N(0, std) after loading (official); 0 = keep

  # Data: any TFDS image classification dataset ("image" + "label" ClassLabel).
  c.dataset = "imagenet2012"
  c.data_dir = ""                 # TFDS data_dir; "" = TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)
  c.train_split = "train"
  c.eval_split = "validation"
  c.num_train_examples = -1       # for epochs -> steps; -1 = read from the dataset info
  c.crop_scale = (0.08, 1.0)      # RandomResizedCrop area range
  c.hflip = True                  # random horizontal flip (p=1/2); False for digits, text, ...
  c.rand_augment = "rand-m9-mstd0.5-inc1"   # timm RandAugment spec; "" = off
  c.reprob = 0.25                 # random erasing probability (per-pixel noise, one box); 0 = off
  c.crop_pct = 0.875              # eval: resize short side to image_size / crop_pct, center crop
  c.prefetch = 2                  # batches assembled on the devices ahead of the step

  # Mixup / cutmix (timm, mode 'batch') and label smoothing.
  c.mixup = 0.8                   # Beta(alpha) of mixup; 0 = off
  c.cutmix = 1.0                  # Beta(alpha) of cutmix; 0 = off
  c.mixup_prob = 1.0              # probability that a batch is mixed
  c.mixup_switch_prob = 0.5       # probability of cutmix instead of mixup when both are on
  c.label_smoothing = 0.1

  # Optimization: AdamW + layer-wise lr decay, lr = blr * batch_size / 256, warmup then half-cosine.
  c.batch_size = 1024             # global (all devices, all processes)
  c.grad_accum_steps = 1          # micro-batches per step (batch_size is still the global batch)
  c.num_epochs = 100
  c.num_train_steps = -1          # when set (> 0) overrides num_epochs
  c.warmup_epochs = 5
  c.warmup_steps = -1             # when set (>= 0) overrides warmup_epochs
  c.blr = 5e-4
  c.min_lr = 1e-6
  c.weight_decay = 0.05
  c.layer_decay = 0.65
  c.b1 = 0.9
  c.b2 = 0.999
  c.adam_eps = 1e-8
  c.seed = 0

  # Devices: mesh axis sizes; -1 = the rest.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.jax_distributed = False       # force jax.distributed.initialize() (auto on TPU pods/SLURM)

  # Checkpoints, logs, evaluation (steps = optimizer updates).
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.keep_period = 0               # also keep every keep_period-th step for good (e.g. one per 100 epochs); 0 = off
  c.async_checkpointing = True
  c.log_every_steps = 100
  c.eval_every_steps = 1250       # top-1/top-5/loss on eval_split (about one epoch); -1 = end only
  c.eval_batch_size = 1024
  c.eval_num_examples = -1        # evaluate on the first N examples only; -1 = the whole split
  c.stop_after_steps = -1         # end this run (with a checkpoint) at this step; schedule unchanged
  c.profile_steps = (0, 0)        # (a, b): jax.profiler trace of steps a+1..b into {workdir}/profile
  # A non-finite loss or gradient norm: "stop" (a message naming the step and the last checkpoint,
  # exit status 3), "skip" (the update is not applied, the step is counted and logged; the run stops
  # after max_consecutive_skips skipped steps in a row) or "rollback" (back to the last checkpoint,
  # or the initial state if there is none, data included; the next rollback_fp32_steps steps after
  # it in float32 (0 = keep the dtype); the run stops, exit status 3, when the loss is non-finite
  # again after max_rollbacks rollbacks in a row with no checkpoint written in between).
  c.nonfinite = "stop"
  c.max_consecutive_skips = 10
  c.rollback_fp32_steps = 0
  c.max_rollbacks = 3
  # An undecodable record is replaced by the mean-colour image (its label kept), counted and logged;
  # more than this fraction of the examples read stops the run with a checkpoint, exit status 4
  # (checked after one epoch or 10 / max_bad_fraction examples). 1.0 = never stop. Undecodable
  # evaluation examples are left out of the accuracy.
  c.max_bad_fraction = 0.001
  # Multi-process runs: a process that dies (no heartbeat for this many seconds) makes every other
  # one print "error: lost process K ...; last checkpoint: ..." and exit with status 5.
  c.peer_timeout_s = 120.0
  # Resuming with another batch_size or seed than the checkpoint's is refused unless this is True
  # (the continuation then differs from the original run); another model never resumes.
  c.allow_resume_changes = False
  return c
