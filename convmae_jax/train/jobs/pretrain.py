"""ConvMAE pretraining (official ``main_pretrain.py``): masked reconstruction of ``config.dataset``
images, every weight trains with AdamW; reconstruction figures of held-out images along the way and,
with ``config.knn_every_steps``, a k-NN top-1 monitor of the encoder on a labelled dataset.

Masking noise is drawn inside the step from ``fold_in(key(seed), step)``; the model masks, encodes
the visible patches and returns the loss on the masked ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging

from convmae_jax import checkpoints, data
from convmae_jax.data import classification as cls_data
from convmae_jax.train import optim, validation, xla_cpu
from convmae_jax.train.errors import ConfigError
from convmae_jax.train.evaluators.knn import KnnMonitor
from convmae_jax.train.evaluators.reconstruction import ReconstructionFigure
from convmae_jax.train.loop import Job, Setup, TrainResult
from convmae_jax.train.rng import MASKING_STREAM, stream_key


class Pretrain(Job):
  """``config.job = "pretrain"`` (configs/pretrain.py, configs/demo.py)."""

  batch_keys = ("image",)

  def __init__(self, config):
    super().__init__(config, validation.validate_config(config))
    self.init_from = config.get("init_from", "") or ""
    self.noise_key = stream_key(config.seed, MASKING_STREAM)
    self.knn_every = config.get("knn_every_steps", 0)
    self.knn_dataset = config.get("knn_dataset", "") or config.dataset

  def check_inputs(self, workdir: str) -> None:
    config = self.config
    # Missing data or a bad split stops the run here, saying where TFDS looked and how to prepare it.
    try:
      data.check_dataset(config.dataset, split=config.train_split,
                         data_dir=config.get("data_dir") or None)
    except data.DatasetNotPreparedError:
      raise
    except ValueError as e:
      raise ConfigError(f"config.train_split / config.dataset: {e}") from None
    if self.init_from:
      try:
        found = checkpoints.latest_step(self.init_from)
      except Exception as e:  # noqa: BLE001 - an unreadable folder
        raise ConfigError(f"config.init_from={self.init_from!r} cannot be read: {e}") from None
      if found is None:
        raise ConfigError(
            f"config.init_from={self.init_from!r} holds no checkpoint; accepted: a workdir or "
            "checkpoints folder written by training or `python -m convmae_jax.interop import`.")
    if self.knn_every > 0:
      for field in ("knn_reference_split", "knn_query_split"):
        self._knn_split(field)

  def _knn_split(self, split_field: str, per_class_field: str | None = None):
    """The k-NN dataset's split named by ``config.<split_field>``: checked (no example read), or
    with ``per_class_field`` its class-balanced subset, read now. ConfigError naming the fields for
    an unknown dataset, a bad split, a dataset without labels or with a single class."""
    config = self.config
    split, data_dir = config[split_field], config.get("data_dir") or None
    where = (f"config.{split_field}={split!r} / config.knn_dataset="
             f"{config.get('knn_dataset', '')!r} (the k-NN monitor reads {self.knn_dataset!r})")
    try:
      if per_class_field is None:
        num_classes = cls_data.label_info(self.knn_dataset, split=split, data_dir=data_dir)[1]
      else:
        return cls_data.create_class_balanced_dataset(
            self.knn_dataset, split=split, per_class=config[per_class_field],
            global_batch_size=config.knn_batch_size, image_size=config.image_size,
            data_dir=data_dir)
    except data.DatasetNotPreparedError:
      raise
    except ValueError as e:
      raise ConfigError(f"{where}: {e}") from None
    if num_classes < 2:
      raise ConfigError(f"{where}: the dataset has {num_classes} class; the k-NN monitor needs a "
                        "labelled dataset with at least 2 classes, such as 'convmae_demo_digits' "
                        "or 'imagenet2012' (set config.knn_dataset).")
    return None

  def make_optimizer(self, schedule, abstract_params):
    return optim.make_optimizer(self.config, schedule, abstract_params)

  def evaluators(self, setup: Setup):
    config = self.config
    evaluators = []
    every = config.get("recon_every_steps", 0) or 0
    at_end = config.get("recon_at_end", True)
    if every > 0 or at_end:
      model = setup.abstract_model
      evaluators.append(ReconstructionFigure(
          dataset=config.dataset, split=config.get("eval_split", "") or "",
          data_dir=config.get("data_dir") or None, num_images=config.get("recon_num_images", 8),
          image_size=config.image_size, norm_pix_loss=config.norm_pix_loss, seed=config.seed,
          every_steps=every, at_end=at_end, graphdef=setup.graphdef_eval,
          patch_size=model.patch_size, num_patches=model.num_patches,
          replicated=setup.shardings.replicated, writer=setup.writer, workdir=setup.workdir,
          is_chief=setup.is_chief))
    if self.knn_every > 0:
      # Both subsets are read now: a bad split stops the run before any compute.
      options, line = xla_cpu.choose(config, self.plan.model_config, self.plan.mesh_shape,
                                     forward_only=True, batch_size=config.knn_batch_size)
      logging.info("k-NN monitor: %s.", line)
      evaluators.append(KnnMonitor(
          reference=self._knn_split("knn_reference_split", "knn_reference_per_class"),
          query=self._knn_split("knn_query_split", "knn_query_per_class"),
          dataset=self.knn_dataset, reference_split=config.knn_reference_split,
          query_split=config.knn_query_split, every_steps=self.knn_every, k=config.knn_k,
          temperature=config.knn_temperature, graphdef_eval=setup.graphdef_eval,
          shardings=setup.shardings, writer=setup.writer, compiler_options=options))
    return evaluators

  def initialise(self, model) -> None:
    if not self.init_from:
      return
    try:
      meta = checkpoints.load_into(self.init_from, model)
    except Exception as e:  # noqa: BLE001 - anything unreadable in the user's folder
      raise ConfigError(
          f"config.init_from={self.init_from!r} cannot be loaded ({type(e).__name__}: {e})") from None
    logging.info("Initialised the weights from %s (%s, step %s).", self.init_from,
                 meta.get("model_name"), meta.get("step"))

  def prepare(self, setup: Setup, batch: dict, step) -> dict:
    noise = jax.random.uniform(jax.random.fold_in(self.noise_key, step),
                               (self.config.batch_size, setup.abstract_model.num_patches),
                               jnp.float32)
    batch["noise"] = jax.lax.with_sharding_constraint(noise, setup.shardings.batch)
    return batch

  def loss(self, model, batch: dict):
    loss, _, _ = model(batch["image"], noise=batch["noise"])
    return loss, {}

  def train_data(self, start_step: int):
    config = self.config
    return data.create_pretrain_dataset(
        config.dataset, split=config.train_split, global_batch_size=config.batch_size,
        image_size=config.image_size, seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), data_dir=config.get("data_dir") or None,
        start_step=start_step, augment=True, scale=tuple(config.crop_scale),
        hflip=config.get("hflip", True))

  def summary(self, result: TrainResult, setup: Setup) -> None:
    first, last = min(result.losses), max(result.losses)
    knn = [s for s in sorted(result.metrics) if "knn_top1" in result.metrics[s]]
    knn_text = (f"; k-NN top-1 {result.metrics[knn[-1]]['knn_top1']:.2f}% at step {knn[-1]}"
                if knn else "")
    logging.info("Done: step %d; loss %.4f at step %d -> %.4f at step %d%s. TensorBoard logs in "
                 "%s, reconstructions in %s, checkpoints in %s.", result.step,
                 result.losses[first], first, result.losses[last], last, knn_text, result.workdir,
                 setup.workdir / "reconstructions", setup.workdir / "checkpoints")
