"""ConvMAE pretraining loop and the job entry point: ``train_and_evaluate(config, workdir)`` runs
``config.job`` ("pretrain" here; "finetune", "linprobe", "evaluate" in ``classification.py``).

Phases, in order: check the config (before any compute) -> mesh, model and shardings -> schedule and
optimizer -> initialise or resume -> the jitted step -> data -> the loop (metrics, checkpoints,
reconstruction figures) -> final checkpoint and figure.

The step is functional: the NNX model is split once into a graph definition, its trainable
parameters (``nnx.Param``) and the rest (frozen position embeddings, RNG state); ``jax.jit`` runs
``step(params, opt_state, rest, images, step)`` with explicit shardings and donated state, and
merges the model inside. Masking noise is drawn inside the step from ``fold_in(key(seed), step)``
and the data pipeline is positioned by step, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from convmae_jax import checkpoints, data, models, visualize
from convmae_jax.train import core, input_pipeline, optim, peers, validation

# Kept for callers of the first release; the shared helpers live in core.
num_train_examples = core.num_train_examples
schedule_lengths = core.schedule_lengths
make_schedule = core.make_schedule


@dataclasses.dataclass
class TrainResult:
  """What a run returns: the last step reached, the per-step losses it logged and the final model."""
  step: int
  losses: dict[int, float]
  model: nnx.Module | None
  workdir: str
  stopped_by: str | None = None   # "SIGTERM", "SIGINT" or "preemption" when the run was asked to stop
  metrics: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)  # eval results
  skipped_steps: list[int] = dataclasses.field(default_factory=list)  # nonfinite="skip"
  bad_examples: int = 0   # undecodable examples read (replaced), all runs of this workdir so far


# --------------------------------------------------------------------------------------------------
# The trainer.
# --------------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str, *, on_log=None) -> TrainResult:
  """Runs the job ``config.job`` (default "pretrain"); pretraining is this module, fine-tuning,
  linear probing and evaluation are in ``convmae_jax.train.classification``.

  ``on_log(step, scalars)``, if given, is called at every log step with the scalars of the
  progress line (loss, learning_rate, grad_norm, images_per_sec, ...), e.g. for a live plot.
  """
  job = config.get("job", "pretrain")
  if job != "pretrain":
    from convmae_jax.train import classification  # pylint: disable=import-outside-toplevel
    return classification.run(config, workdir, on_log=on_log)
  return pretrain(config, workdir, on_log=on_log)


def pretrain(config, workdir: str, *, on_log=None) -> TrainResult:
  """Pretrains ``config.model`` on ``config.dataset``, resuming from ``workdir`` when it has checkpoints.

  Writes TensorBoard events and ``reconstructions/step_XXXXXX.png`` under ``workdir`` and Orbax
  checkpoints under ``workdir/checkpoints``. Returns the final step, the logged losses
  (``{step: mean loss of the steps since the previous log line}``; every step with
  ``log_every_steps=1``) and the final model.
  """
  # ===================================== Config checks (no compute) ============================
  plan = validation.validate_config(config)
  core.quiet_library_logs()
  core.check_workdir(workdir)
  # Missing data or a bad split stops the run here, saying where TFDS looked and how to prepare it.
  try:
    data.check_dataset(config.dataset, split=config.train_split,
                       data_dir=config.get("data_dir") or None)
  except data.DatasetNotPreparedError:
    raise
  except ValueError as e:
    raise validation.ConfigError(f"config.train_split / config.dataset: {e}") from None
  init_from = config.get("init_from", "") or ""
  if init_from:
    try:
      found = checkpoints.latest_step(init_from)
    except Exception as e:  # noqa: BLE001 - an unreadable folder
      raise validation.ConfigError(f"config.init_from={init_from!r} cannot be read: {e}") from None
    if found is None:
      raise validation.ConfigError(
          f"config.init_from={init_from!r} holds no checkpoint; accepted: a workdir or checkpoints "
          "folder written by training or `python -m convmae_jax.interop import`.")
  n_examples, total_steps, warmup_steps, steps_per_epoch = core.resolve_schedule(config)
  end_step = core.end_step(config, total_steps)

  # ===================================== Writers and mesh ======================================
  workdir_path, writer, mesh = core.open_workdir(config, workdir, plan.mesh_shape)
  is_chief = jax.process_index() == 0

  # ===================================== Model (abstract), optimizer and shardings =============
  def create_model():
    return models.create(config.model, rngs=nnx.Rngs(config.seed), **plan.model_overrides)

  abstract_model = nnx.eval_shape(create_model)
  graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
  core.write_parameter_table(workdir_path, abstract_params, config.model, plan.model_config)
  patch_size = abstract_model.patch_size
  num_patches = abstract_model.num_patches
  model_meta = {"model_name": config.model, "model_kwargs": plan.model_config.to_dict()}
  schedule = core.make_schedule(config, total_steps, warmup_steps)
  tx = optim.make_optimizer(config, schedule, abstract_params)
  sh = core.state_shardings(mesh, abstract_params, abstract_rest, tx)
  logging.info("%d steps (%.1f epochs of %s examples at global batch %d), warmup %.1f steps, "
               "peak lr %.3g.", total_steps, total_steps / steps_per_epoch if n_examples else float("nan"),
               n_examples, config.batch_size, warmup_steps,
               optim.peak_learning_rate(config.blr, config.batch_size))

  # ===================================== Reconstruction figure =================================
  # The held-out images are read now, so a bad eval split stops the run before any compute.
  recon_every = config.get("recon_every_steps", 0) or 0
  figure = None
  if recon_every > 0 or config.get("recon_at_end", True):
    figure = _ReconstructionFigure(config, workdir_path, graphdef, patch_size, num_patches,
                                   sh.replicated, writer, is_chief)

  # ===================================== Initialise or resume ==================================
  ckpt_mgr = core.open_checkpoints(config, workdir)

  def restore(mgr, step):
    # The config must fit the checkpoint (checked on its meta alone, before any array is read).
    validation.check_resume(core.read_train_meta(mgr, step), config, plan.model_config, mgr.directory)
    a_model = nnx.eval_shape(create_model)
    _, a_params, a_rest = nnx.split(a_model, nnx.Param, ...)
    return core.restore_train_state(mgr, step, a_params, a_rest, sh, tx)

  try:
    ckpt_mgr, latest, restored = core.restore_readable(config, workdir, ckpt_mgr, restore)
  except validation.ConfigError:
    ckpt_mgr.close()
    raise
  bad_examples = 0                   # undecodable examples read so far (all runs of this workdir)
  if latest is not None:
    params, opt_state, rest, meta = restored
    start_step = int(meta.get("step", latest))
    bad_examples = int(meta.get("bad_examples", 0))
    if meta.get("seed", config.seed) != config.seed or meta.get("batch_size",
                                                                config.batch_size) != config.batch_size:
      logging.warning("Resuming step %d written with seed=%s batch_size=%s, now seed=%s batch_size=%s "
                      "(config.allow_resume_changes): the continuation differs from the original run.",
                      start_step, meta.get("seed"), meta.get("batch_size"), config.seed,
                      config.batch_size)
    logging.info("Resumed from %s at step %d.", ckpt_mgr.directory, start_step)
  else:
    def init():
      _, p, r = nnx.split(create_model(), nnx.Param, ...)
      return p, r
    params, rest = jax.jit(init, out_shardings=(sh.params, sh.rest))()
    if init_from:
      model = nnx.merge(graphdef, params, rest)
      try:
        meta = checkpoints.load_into(init_from, model)
      except Exception as e:  # noqa: BLE001 - anything unreadable in the user's folder
        ckpt_mgr.close()
        raise validation.ConfigError(
            f"config.init_from={init_from!r} cannot be loaded ({type(e).__name__}: {e})") from None
      _, params, rest = nnx.split(model, nnx.Param, ...)
      logging.info("Initialised the weights from %s (%s, step %s).", init_from,
                   meta.get("model_name"), meta.get("step"))
    opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(params)
    start_step = 0

  # ===================================== The step ==============================================
  noise_key = core.stream_key(config.seed, core.MASKING_STREAM)
  batch_size = config.batch_size

  def prepare(batch, step):
    noise = jax.random.uniform(jax.random.fold_in(noise_key, step), (batch_size, num_patches),
                               jnp.float32)
    batch["noise"] = jax.lax.with_sharding_constraint(noise, sh.batch)
    return batch

  def loss_fn(model, batch):
    loss, _, _ = model(batch["image"], noise=batch["noise"])
    return loss, {}

  train_step = core.build_train_step(
      graphdef=graphdef, param_filter=nnx.Param, loss_fn=loss_fn, tx=tx, schedule=schedule,
      shardings=sh, batch_size=batch_size, grad_accum_steps=config.grad_accum_steps,
      remat=config.get("remat", False), seed=config.seed,
      skip_nonfinite=config.get("nonfinite", "stop") == "skip", batch_keys=("image", data.BAD_KEY),
      prepare=prepare)

  # ===================================== Data ==================================================
  result = TrainResult(step=start_step, losses={}, model=None, workdir=str(workdir))
  if start_step >= end_step:
    logging.info("Nothing to do: step %d already reached (end step %d).", start_step, end_step)
    ckpt_mgr.close()
    result.model = nnx.merge(graphdef, params, rest)
    return result
  host_iter = data.create_pretrain_dataset(
      config.dataset, split=config.train_split, global_batch_size=batch_size,
      image_size=config.image_size, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), data_dir=config.get("data_dir") or None,
      start_step=start_step, augment=True, scale=tuple(config.crop_scale))
  batches = input_pipeline.DevicePrefetcher(host_iter, sh.batch, prefetch=config.get("prefetch", 2))

  # ===================================== The loop ==============================================
  window = core.MetricsWindow(
      writer=writer, total_steps=total_steps, batch_size=batch_size, start_step=start_step,
      steps_per_epoch=steps_per_epoch if n_examples else None,
      last_checkpoint=lambda: f"step {ckpt_mgr.latest_step()} in {ckpt_mgr.directory}",
      on_log=on_log, nonfinite=config.get("nonfinite", "stop"),
      max_consecutive_skips=config.get("max_consecutive_skips", 10),
      max_bad_fraction=config.get("max_bad_fraction", 1.0), bad_examples=bad_examples,
      min_examples_for_bad_check=core.min_examples_for_bad_check(config, n_examples))
  logging.info("Training steps %d..%d of %d (global batch %d).", start_step + 1, end_step,
               total_steps, batch_size)
  profiler = core.Profiler(config, workdir_path)
  watchdog = peers.PeerWatchdog(config.get("peer_timeout_s", 120),
                                peers.finished_steps_text(ckpt_mgr.directory))
  with watchdog:                     # a lost peer ends the run within peer_timeout_s
    try:
      with core.StopRequest() as stop:
        for step in range(start_step, end_step):
          done = step + 1                    # updates finished after this iteration
          batch = window.next_batch(batches)
          window.note_bad_examples(done, batch.get(input_pipeline.DevicePrefetcher.HOST, {}))
          params, opt_state, rest, metrics = train_step(
              params, opt_state, rest, {k: batch[k] for k in ("image", data.BAD_KEY)}, np.int32(step))
          window.add(done, metrics)
          profiler(done, metrics)
          result.stopped_by = stop.requested(done, ckpt_mgr)
          result.step = done
          is_last = done == end_step or result.stopped_by is not None

          if done % config.log_every_steps == 0 or is_last:
            result.losses[done] = window.log(done)["loss"]

          def save():
            window.fetch()                   # never checkpoint past a non-finite loss
            meta = {**model_meta, "step": done, "seed": config.seed, "batch_size": batch_size,
                    "data_position": done, "dataset": config.dataset, "total_steps": total_steps,
                    "bad_examples": window.bad_examples}
            core.save_train_state(ckpt_mgr, done, params, rest, opt_state, meta)

          core.checkpoint_step(window, ckpt_mgr, done, save,
                               due=done % config.checkpoint_every_steps == 0 or is_last)

          if figure is not None and ((recon_every > 0 and done % recon_every == 0) or
                                     (is_last and config.get("recon_at_end", True))):
            figure.write(done, params, rest)
          if result.stopped_by is not None:
            break
    finally:
      result.skipped_steps = list(window.skipped_steps)
      result.bad_examples = window.bad_examples
      profiler.close()
      window.close()
      batches.close()
      ckpt_mgr.wait_until_finished()
      ckpt_mgr.close()
      writer.flush()

  result.model = nnx.merge(graphdef, params, rest)
  first, last = min(result.losses), max(result.losses)
  if result.stopped_by is not None:
    logging.warning("Stopped by %s at step %d of %d with a checkpoint in %s; run the same command "
                    "again to resume.", result.stopped_by, result.step, total_steps,
                    workdir_path / "checkpoints")
  logging.info("Done: step %d; loss %.4f at step %d -> %.4f at step %d. TensorBoard logs in %s, "
               "reconstructions in %s, checkpoints in %s.", result.step, result.losses[first], first,
               result.losses[last], last, workdir, workdir_path / "reconstructions",
               workdir_path / "checkpoints")
  return result


def _held_out_split(dataset: str, data_dir: str | None) -> str:
  """The dataset's first split of "validation" and "test" (ImageNet: validation; demo: test)."""
  splits = data.get_builder(dataset, data_dir=data_dir).info.splits
  for name in ("validation", "test"):
    if name in splits:
      return name
  raise validation.ConfigError(f"Dataset {dataset!r} has no 'validation' or 'test' split for the reconstruction "
                   f"figure (splits: {sorted(splits)}); set config.eval_split.")


class _ReconstructionFigure:
  """original | masked | reconstruction grids of fixed held-out images with a fixed mask."""

  def __init__(self, config, workdir, graphdef, patch_size, num_patches, repl, writer, is_chief):
    data_dir = config.get("data_dir") or None
    split = config.get("eval_split", "") or _held_out_split(config.dataset, data_dir)
    available = data.num_examples(config.dataset, split=split, data_dir=data_dir)
    self.images = np.asarray(data.create_eval_batch(
        config.dataset, split=split,
        num_images=min(config.get("recon_num_images", 8), available),
        image_size=config.image_size, data_dir=data_dir), np.float32)
    self.patch_size = patch_size
    self.norm_pix_loss = config.norm_pix_loss
    self.dir = workdir / "reconstructions"
    self.writer = writer
    self.is_chief = is_chief
    noise = jax.random.uniform(
        core.stream_key(config.seed, core.FIGURE_STREAM),
        (self.images.shape[0], num_patches), jnp.float32)

    def predict(p, r, images):
      model = nnx.merge(graphdef, p, r)
      _, pred, mask = model(images, noise=noise)
      # Complementary masks give one row per group; the figure shows each image's first group.
      groups = model.num_groups
      return pred[::groups].astype(jnp.float32), mask[::groups].astype(jnp.float32)

    self.predict = jax.jit(predict, out_shardings=(repl, repl))
    self.repl = repl

  def write(self, step: int, params, rest) -> str | None:
    images = jax.device_put(self.images, self.repl)
    pred, mask = jax.device_get(self.predict(params, rest, images))
    if not self.is_chief:
      return None
    grid = visualize.reconstruction_grid(self.images, pred, mask, patch_size=self.patch_size,
                                         norm_pix_loss=self.norm_pix_loss)
    grid = np.asarray(grid)
    self.writer.write_images(step, {"reconstruction": grid[None]})
    self.dir.mkdir(parents=True, exist_ok=True)
    path = os.fspath(self.dir / f"step_{step:06d}.png")
    visualize.save_png(grid, path)
    logging.info("Reconstructions of step %d written to %s", step, path)
    return path
