r"""ConvMAE pretraining on ImageNet-1k, the official recipe (ConvMAE PRETRAIN.md).

    python main.py --config=configs/pretrain.py --workdir=/path/to/workdir          # ConvMAE-Base
    python main.py --config=configs/pretrain.py:large --workdir=...                 # another size

Sizes: tiny, small, base (the only official one), large, huge (unofficial, after the ConvMAE-v2 tables).
Expected result (Base, 1600 epochs on TFDS imagenet2012 at global batch 3072): the official
ConvMAE-B encoder reaches 85.0% ImageNet-1k top-1 after fine-tuning (84.4% after 200 pretraining
epochs). The pretraining loss (normalized-pixel MSE on masked patches) starts near 1.0. The run
writes TensorBoard logs and reconstruction PNGs in the workdir and resumes from its latest
checkpoint when restarted on the same workdir.

Every field can be overridden on the command line, e.g.
    --config.batch_size=4096 --config.mesh.fsdp=8 --config.dtype=float32 --config.num_epochs=800
A quick check on a CPU with the embedded photos (no ImageNet needed):
    python main.py --config=configs/pretrain.py --workdir=/tmp/base_smoke \
      --config.dataset=convmae_demo_photos --config.batch_size=8 --config.num_train_steps=3 \
      --config.log_every_steps=1
"""

import ml_collections
from ml_collections.config_dict import placeholder

SIZES = ("tiny", "small", "base", "large", "huge")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Recipe config; ``arg`` is the model size (default "base")."""
  size = (arg or "base").strip()
  if size not in SIZES:
    raise ValueError(f"Unknown model size {size!r} in configs/pretrain.py:{size}; accepted: {SIZES}")
  c = ml_collections.ConfigDict()
  c.job = "pretrain"              # pretrain | finetune | linprobe | evaluate (configs/finetune.py, ...)

  # Model: registry name and overrides of any ConvMAEConfig field (embed_dims, depths, ...).
  c.model = f"convmae_{size}"
  # Model-size overrides; None = the size table's value. E.g.
  # --config.model_kwargs.depths="(2,2,8)" --config.model_kwargs.decoder_depth=4
  c.model_kwargs = ml_collections.ConfigDict({
      "embed_dims": placeholder(tuple), "depths": placeholder(tuple), "num_heads": placeholder(int),
      "mlp_ratios": placeholder(tuple), "patch_sizes": placeholder(tuple),
      "decoder_embed_dim": placeholder(int), "decoder_depth": placeholder(int),
      "decoder_num_heads": placeholder(int), "decoder_mlp_ratio": placeholder(float),
      "conv_impl": placeholder(str),     # "visible" (default) | "dense": same function
      "dwconv_impl": placeholder(str),   # "auto" (default) | "shift" | "lax": same function
      "attention_impl": placeholder(str),  # "auto" (default) | "explicit" | "xla" | "cudnn"
  })
  c.image_size = 224              # pixels; a multiple of the total stride 16
  c.mask_ratio = 0.75             # fraction of the (image_size/16)^2 tokens removed
  c.norm_pix_loss = True          # regress per-patch normalized pixels
  # FastConvMAE: split each image's tokens into 1/(1 - mask_ratio) complementary visible groups
  # that cover it once; the loss averages the groups (configs/fastconvmae.py has its recipe).
  c.complementary_masks = False
  # Compute dtype: "auto" (bfloat16 on GPU/TPU and on CPUs with AVX512-BF16 or AMX, float32 on
  # other CPUs: train/precision.py) | "float32" | "bfloat16"; parameters stay float32.
  c.dtype = "auto"
  c.remat = False                 # recompute activations in the backward pass (less memory)
  c.cpu_matmuls = "auto"          # XLA:CPU matrix products: "auto" | "ynnpack" | "eigen" (train/xla_cpu.py)
  c.host_malloc = "auto"          # reuse freed host memory on CPU: "auto" | "reuse" | "system" (host_malloc.py)

  # Data: TFDS name, splits, crop. Images are RandomResizedCrop(image_size, crop_scale, bicubic),
  # random horizontal flip, ImageNet mean/std normalization.
  c.dataset = "imagenet2012"
  c.data_dir = ""                 # TFDS data_dir; "" = TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)
  c.train_split = "train"
  c.eval_split = ""               # held-out images for the figure; "" = "validation" or else "test"
  c.crop_scale = (0.2, 1.0)
  c.hflip = True                  # random horizontal flip (p=1/2); False for digits, text, ...
  c.num_train_examples = -1       # for epochs -> steps; -1 = read from the dataset info
  c.prefetch = 2                  # batches assembled on the devices ahead of the step

  # Optimization: AdamW, lr = blr * batch_size / 256, warmup then half-cosine per step.
  c.batch_size = 3072             # global (all devices, all processes); PRETRAIN.md: 128 x 24 GPUs
  c.grad_accum_steps = 1          # micro-batches per step (batch_size is still the global batch)
  c.num_epochs = 1600
  c.num_train_steps = -1          # when set (> 0) overrides num_epochs
  c.warmup_epochs = 40
  c.warmup_steps = -1             # when set (>= 0) overrides warmup_epochs
  c.blr = 1.5e-4
  c.min_lr = 0.0
  c.weight_decay = 0.05           # on all >= 2-D params incl. mask_token; none on biases/norms
  c.b1 = 0.9
  c.b2 = 0.95
  c.adam_eps = 1e-8               # AdamW epsilon (PyTorch's default)
  c.seed = 0

  # Devices: mesh axis sizes; -1 = the rest. Batch over data x fsdp; params sharded over fsdp.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.jax_distributed = False       # force jax.distributed.initialize() (auto on TPU pods/SLURM)

  # Checkpoints, logs, figures (steps = optimizer updates).
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.keep_period = 0               # also keep every keep_period-th step for good (e.g. one per 100 epochs); 0 = off
  c.async_checkpointing = True    # write checkpoints in the background while training goes on
  c.log_every_steps = 100
  c.recon_every_steps = 5000
  c.recon_at_end = True           # also write the figure after the last step
  c.recon_num_images = 8
  # k-NN monitor: every knn_every_steps steps (0 = off) and at the last step, the weighted k-NN
  # top-1 (percent; knn_k neighbours, votes exp(cosine / knn_temperature)) of the unmasked encoder's
  # pooled, L2-normalised embeddings: the first knn_query_per_class examples of each class of
  # knn_query_split against the first knn_reference_per_class of each class of knn_reference_split
  # (each split's fixed order). Logged as knn_top1 and knn_seconds; not counted in img/s.
  c.knn_every_steps = 0
  c.knn_dataset = ""              # a labelled TFDS dataset (image + ClassLabel label); "" = dataset
  c.knn_reference_split = "train"
  c.knn_query_split = "validation"
  c.knn_reference_per_class = 10
  c.knn_query_per_class = 10
  c.knn_k = 20
  c.knn_temperature = 0.07
  c.knn_batch_size = 256          # global; a multiple of the data-parallel devices and processes
  c.init_from = ""                # workdir or model-only checkpoint to take the initial weights from
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
  # A record that cannot be decoded (truncated JPEG, bytes that are no image) is replaced by the
  # mean-colour image, counted and logged. When more than this fraction of the examples read were
  # bad (checked after one epoch or 10 / max_bad_fraction examples, whichever comes first), the
  # run stops with a checkpoint, naming them, exit status 4. 1.0 = never stop.
  c.max_bad_fraction = 0.001
  # Multi-process runs: a process that dies (no heartbeat for this many seconds) makes every other
  # one print "error: lost process K ...; last checkpoint: ..." and exit with status 5.
  c.peer_timeout_s = 120.0
  # Resuming with another batch_size or seed than the checkpoint's is refused unless this is True
  # (the continuation then differs from the original run); another model never resumes.
  c.allow_resume_changes = False
  return c
