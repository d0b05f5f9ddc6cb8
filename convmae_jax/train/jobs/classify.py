"""Fine-tuning and linear probing of a ConvViT classifier, chosen by ``config.job``:

* ``finetune`` (official ``main_finetune.py``): every weight trains; AdamW with layer-wise lr decay
  and the official weight-decay groups; drop path; mixup/cutmix with label-smoothed soft targets;
  RandAugment and random erasing in the data pipeline.
* ``linprobe`` (official ``main_linprobe.py``): the encoder is frozen (not differentiated, so its
  backward pass is never computed); BatchNorm without affine + a linear head train with LARS.

Both start from ``config.init_from`` (a pretraining workdir, a model-only checkpoint or an official
``.pth``) and evaluate top-1 every ``eval_every_steps`` with the best checkpoint kept in
``{workdir}/best``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from convmae_jax import checkpoints, data, models, weights
from convmae_jax.data import classification as cls_data
from convmae_jax.train import losses, mixup, optim, validation, xla_cpu
from convmae_jax.train.errors import ConfigError
from convmae_jax.train.evaluators.classification import TopKEvaluator
from convmae_jax.train.loop import Job, Setup, TrainResult
from convmae_jax.train.rng import HEAD_INIT_STREAM, MIXUP_STREAM, stream_key

BEST_SUBDIR = "best"


def trainable_filter(job: str):
  """Fine-tuning trains every nnx.Param; the linear probe only the head."""
  if job == "linprobe":
    return nnx.All(nnx.Param, lambda path, _: len(path) > 0 and path[0] == "head")
  return nnx.Param


def check_labels_and_init(config, plan) -> str:
  """The dataset's labels fit ``config.num_classes`` and ``config.init_from`` exists (evaluation
  needs one); returns init_from ("" for none). ConfigError otherwise."""
  job = config.job
  data_dir = config.get("data_dir") or None
  try:
    if job != "evaluate":
      _, n_classes = cls_data.label_info(config.dataset, split=config.train_split, data_dir=data_dir)
    _, n_eval_classes = cls_data.label_info(config.dataset, split=config.eval_split, data_dir=data_dir)
  except data.DatasetNotPreparedError:
    raise
  except ValueError as e:  # no labels, a bad split
    raise ConfigError(str(e)) from None
  if job == "evaluate":
    n_classes = n_eval_classes
  if plan.model_config.num_classes != n_classes:
    raise ConfigError(f"config.num_classes={plan.model_config.num_classes} does not match dataset "
                      f"{config.dataset!r}, which has {n_classes} classes; set "
                      f"--config.num_classes={n_classes}.")
  init_from = config.get("init_from", "") or ""
  if job == "evaluate" and not init_from:
    raise ConfigError("config.init_from is empty: the evaluate job needs a classifier checkpoint "
                      "(a fine-tuning workdir, a model-only checkpoint or a fine-tuned .pth).")
  if init_from and not (os.path.exists(init_from) or str(init_from).startswith("gs://")):
    raise ConfigError(f"config.init_from={init_from!r} does not exist; accepted: a pretraining "
                      "workdir, a model-only checkpoint folder, or a .pth/.safetensors file.")
  return init_from


def read_init(config, plan, init_from: str, *, expect: str) -> dict:
  """The official-layout state dict of ``init_from``, checked against the model without building
  it: a checkpoint of the right kind whose position embedding fits. ConfigError otherwise."""
  abstract = nnx.eval_shape(lambda: models.create(config.model, rngs=nnx.Rngs(0),
                                                  **plan.model_overrides))
  try:
    sd, meta = weights.read_state_dict(init_from)
    weights.check_kind(sd, expect, name=meta.get("model_name") or init_from)
    weights.fit_pos_embed(sd, abstract)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"config.init_from={init_from!r}: {e}") from None
  return sd


def open_eval_data(config):
  """The evaluation split, batched for the devices (the last batch padded; ``valid`` marks rows)."""
  return cls_data.create_eval_dataset(
      config.dataset, split=config.eval_split, global_batch_size=config.eval_batch_size,
      image_size=config.image_size, crop_pct=config.crop_pct,
      data_dir=config.get("data_dir") or None,
      num_examples=config.eval_num_examples if config.eval_num_examples > 0 else None)


class Classify(Job):
  """``config.job = "finetune"`` or ``"linprobe"`` (configs/finetune.py, configs/linprobe.py)."""

  batch_keys = ("image", "label")

  def __init__(self, config):
    plan = validation.validate_classification_config(config)
    if config.job not in ("finetune", "linprobe"):
      raise ConfigError(f"config.job={config.job!r} is not a classification training job; "
                        "accepted: 'finetune', 'linprobe'.")
    super().__init__(config, plan)
    self.trainable = trainable_filter(config.job)
    self.forward_only_step = config.job == "linprobe"    # the frozen encoder is not differentiated
    self.init_from = ""
    self.init_sd = None
    self.top1 = None
    self.num_classes = plan.model_config.num_classes
    self.use_mixup = (config.job == "finetune" and config.mixup_prob > 0
                      and (config.mixup > 0 or config.cutmix > 0))
    self.smoothing = config.label_smoothing if config.job == "finetune" else 0.0
    self.mix_key = stream_key(config.seed, MIXUP_STREAM)

  def check_inputs(self, workdir: str) -> None:
    self.init_from = check_labels_and_init(self.config, self.plan)
    # The initial weights are read and checked against the model now (kind, shapes, position
    # embedding), unless the workdir already has a checkpoint to resume from.
    if self.init_from and checkpoints.latest_step(workdir) is None:
      self.init_sd = read_init(self.config, self.plan, self.init_from, expect="pretraining")

  def make_optimizer(self, schedule, abstract_params):
    if self.config.job == "finetune":
      return optim.make_finetune_optimizer(self.config, schedule, abstract_params)
    return optim.make_lars_optimizer(self.config, schedule, abstract_params)

  def evaluators(self, setup: Setup):
    config = self.config
    options, line = xla_cpu.choose(config, self.plan.model_config, self.plan.mesh_shape,
                                   forward_only=True, batch_size=config.eval_batch_size)
    logging.info("Evaluation: %s.", line)
    self.top1 = TopKEvaluator(
        eval_data=open_eval_data(config), split=config.eval_split,
        every_steps=config.eval_every_steps, graphdef_eval=setup.graphdef_eval,
        shardings=setup.shardings, writer=setup.writer, best_dir=setup.workdir / BEST_SUBDIR,
        best_meta={"model_name": config.model, "model_kwargs": self.plan.model_config.to_dict(),
                   "eval_split": config.eval_split, "dataset": config.dataset, "job": config.job},
        compiler_options=options)
    return [self.top1]

  def initialise(self, model) -> None:
    config = self.config
    if not self.init_from:
      logging.warning("config.init_from is empty: training from random initialisation.")
      return
    head_std = config.head_init_std if config.head_init_std > 0 else None
    try:
      report = weights.init_classifier(model, self.init_sd, head_std=head_std, expect="pretraining",
                                       key=stream_key(config.seed, HEAD_INIT_STREAM))
    except (ValueError, FileNotFoundError) as e:
      raise ConfigError(f"config.init_from={self.init_from!r}: {e}") from None
    logging.info("Initialised the encoder from %s (%s checkpoint, %d tensors; position embedding "
                 "resized %s).", self.init_from, report["kind"], report["loaded"],
                 report["pos_embed_resized"] or "no")

  def prepare(self, setup: Setup, batch: dict, step) -> dict:
    config = self.config
    if self.use_mixup:
      images, targets, _ = mixup.mixup_cutmix(
          jax.random.fold_in(self.mix_key, step), batch["image"], batch["label"],
          num_classes=self.num_classes, mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
          switch_prob=config.mixup_switch_prob, prob=config.mixup_prob,
          label_smoothing=self.smoothing)
    else:
      images = batch["image"]
      targets = losses.smoothed_one_hot(batch["label"], self.num_classes, self.smoothing)
    return {"image": images,
            "target": jax.lax.with_sharding_constraint(targets, setup.shardings.batch)}

  def loss(self, model, batch: dict):
    logits = model(batch["image"])
    # Soft-target CE equals timm's LabelSmoothingCrossEntropy on smoothed one-hots, and plain CE
    # when smoothing is 0 (linear probe).
    return jnp.mean(losses.soft_target_cross_entropy(logits, batch["target"])), {}

  def train_data(self, start_step: int):
    config = self.config
    return cls_data.create_train_dataset(
        config.dataset, split=config.train_split, global_batch_size=config.batch_size,
        image_size=config.image_size, seed=config.seed, recipe=config.job,
        process_index=jax.process_index(), process_count=jax.process_count(),
        data_dir=config.get("data_dir") or None, start_step=start_step,
        scale=tuple(config.crop_scale), rand_augment=config.get("rand_augment", "") or "",
        reprob=config.get("reprob", 0.0), hflip=config.get("hflip", True))

  def checkpoint_meta(self) -> dict:
    return {"job": self.config.job}

  def summary(self, result: TrainResult, setup: Setup) -> None:
    if not result.metrics:
      return
    last = result.metrics[max(result.metrics)]
    logging.info("Done: step %d; eval top1 %.2f%% top5 %.2f%% (best %.2f%%, weights in %s). "
                 "Checkpoints in %s, TensorBoard logs in %s.", result.step, last["top1"],
                 last["top5"], self.top1.best, setup.workdir / BEST_SUBDIR,
                 setup.workdir / "checkpoints", result.workdir)
