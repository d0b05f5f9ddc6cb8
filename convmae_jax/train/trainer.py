"""ConvMAE pretraining loop: ``train_and_evaluate(config, workdir)``.

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
import logging as std_logging
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath
from flax import nnx

from convmae_jax import checkpoints, data, models, visualize
from convmae_jax.train import input_pipeline, optim, sharding as sharding_lib, validation

# Stream ids folded into the run seed, so init, masking and the figure never share random numbers.
_MASKING_STREAM = 1
_FIGURE_STREAM = 2


@dataclasses.dataclass
class TrainResult:
  """What a run returns: the last step reached, the per-step losses it logged and the final model."""
  step: int
  losses: dict[int, float]
  model: nnx.Module | None
  workdir: str
  stopped_by: str | None = None   # "SIGTERM", "SIGINT" or "preemption" when the run was asked to stop


# --------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------
class _DropLibraryInfo(std_logging.Filter):
  """Orbax logs dozens of INFO lines per checkpoint; keep its warnings and errors only."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "orbax" not in (record.pathname or "")


def _quiet_library_logs() -> None:
  logger = logging.get_absl_logger()  # Orbax logs through absl
  if not any(isinstance(f, _DropLibraryInfo) for f in logger.filters):
    logger.addFilter(_DropLibraryInfo())


def _flatten_config(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten_config(v, key + "."))
    elif isinstance(v, (int, float, str, bool)) or v is None:
      out[key] = v if v is not None else "None"
    else:
      out[key] = str(v)
  return out


def _deep_merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _deep_merge(out[k], v) if k in out and isinstance(v, dict) else v
  return out


def _select(tree: Any, template: Any) -> Any:
  """The part of ``tree`` whose keys appear in ``template`` (int and digit-string keys match)."""
  if not isinstance(template, dict):
    return tree
  out = {}
  for k, v in template.items():
    src = tree[k] if k in tree else tree[str(k)]
    out[k] = _select(src, v)
  return out


class _StopRequest:
  """SIGTERM / Ctrl-C / a pod preemption notice → finish the step, checkpoint, and stop.

  Single process: Python handlers set a flag (a second signal acts as usual). Several processes:
  all of them must stop at the same step, which JAX's preemption sync point decides (via Orbax).
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
    logging.warning("%s received: stopping after this step with a checkpoint.", self.signal_name)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def requested(self, step: int, ckpt_mgr) -> str | None:
    if jax.process_count() > 1:
      return "preemption" if ckpt_mgr.reached_preemption(step) else None
    return self.signal_name


def _format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def num_train_examples(config) -> int:
  """Examples in the training split: from the dataset's info, else ``config.num_train_examples``."""
  n = config.get("num_train_examples", -1)
  if n and n > 0:
    return int(n)
  try:
    return int(data.num_examples(config.dataset, split=config.train_split,
                                 data_dir=config.get("data_dir") or None))
  except (FileNotFoundError, ValueError):  # missing dataset / bad split: data's message says it all
    raise
  except Exception as e:  # the info is needed only to turn epochs into steps
    raise validation.ConfigError(
        f"Could not read the number of examples of {config.dataset!r} split "
        f"{config.train_split!r} ({type(e).__name__}: {e}); set config.num_train_examples, or "
        "config.num_train_steps instead of num_epochs.") from e


def schedule_lengths(config, n_examples: int | None) -> tuple[int, float, float]:
  """(total_steps, warmup_steps, steps_per_epoch) for the config's epochs or explicit step count."""
  steps_per_epoch = (n_examples / config.batch_size) if n_examples else float("nan")
  if config.num_train_steps != -1:
    total = int(config.num_train_steps)
  else:
    total = int(math.ceil(config.num_epochs * steps_per_epoch))
  if config.get("warmup_steps", -1) != -1:
    warmup = float(config.warmup_steps)
  else:
    warmup = config.warmup_epochs * steps_per_epoch
  if not math.isfinite(warmup):
    raise validation.ConfigError("config.warmup_epochs needs the dataset size; set config.warmup_steps or "
                     "config.num_train_examples.")
  return total, min(warmup, float(total)), steps_per_epoch


def make_schedule(config, total_steps: int, warmup_steps: float):
  peak = optim.peak_learning_rate(config.blr, config.batch_size)
  return optim.warmup_cosine_schedule(peak_lr=peak, warmup_steps=warmup_steps,
                                      total_steps=total_steps, min_lr=config.get("min_lr", 0.0))


# --------------------------------------------------------------------------------------------------
# The trainer.
# --------------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str) -> TrainResult:
  """Pretrains ``config.model`` on ``config.dataset``, resuming from ``workdir`` when it has checkpoints.

  Writes TensorBoard events and ``reconstructions/step_XXXXXX.png`` under ``workdir`` and Orbax
  checkpoints under ``workdir/checkpoints``. Returns the final step, the logged losses
  (``{step: mean loss of the steps since the previous log line}``; every step with
  ``log_every_steps=1``) and the final model.
  """
  # ===================================== Config checks (no compute) ============================
  plan = validation.validate_config(config)
  _quiet_library_logs()
  # Missing data or a bad split stops the run here, saying where TFDS looked and how to prepare it.
  data.check_dataset(config.dataset, split=config.train_split, data_dir=config.get("data_dir") or None)
  init_from = config.get("init_from", "") or ""
  if init_from and checkpoints.latest_step(init_from) is None:
    raise validation.ConfigError(f"config.init_from={init_from!r} holds no checkpoint; accepted: a workdir or "
                     "checkpoints folder written by training or `python -m convmae_jax.interop import`.")
  needs_size = config.num_train_steps == -1 or (config.get("warmup_steps", -1) == -1
                                                and config.warmup_epochs)
  try:
    n_examples = num_train_examples(config)
  except ValueError:
    if needs_size:
      raise
    n_examples = None  # only used to report epochs
  total_steps, warmup_steps, steps_per_epoch = schedule_lengths(config, n_examples)
  stop_after = config.get("stop_after_steps", -1)
  end_step = min(total_steps, stop_after) if stop_after and stop_after > 0 else total_steps

  # ===================================== Writers and mesh ======================================
  workdir_path = epath.Path(workdir)
  is_chief = jax.process_index() == 0
  if is_chief:
    workdir_path.mkdir(parents=True, exist_ok=True)
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  writer.write_hparams(_flatten_config(config.to_dict()))
  mesh = sharding_lib.make_mesh(*plan.mesh_shape)
  num_devices = jax.device_count()
  logging.info("Mesh %s over %d devices (%s), %d process(es).", dict(mesh.shape), num_devices,
               jax.devices()[0].platform, jax.process_count())

  # ===================================== Model (abstract) and shardings ========================
  def create_model():
    return models.create(config.model, rngs=nnx.Rngs(config.seed), **plan.model_overrides)

  abstract_model = nnx.eval_shape(create_model)
  graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
  param_sh = sharding_lib.param_shardings(abstract_params, mesh)
  rest_sh = sharding_lib.replicated_shardings(abstract_rest, mesh)
  repl = sharding_lib.replicated(mesh)
  batch_sh = sharding_lib.batch_sharding(mesh)
  n_params = sum(x.size for x in jax.tree.leaves(abstract_params))
  logging.info("Model %s %s: %.2fM trainable parameters.\n%s", config.model,
               plan.model_config.to_dict(), n_params / 1e6,
               parameter_overview.get_parameter_overview(nnx.to_pure_dict(abstract_params),
                                                         include_stats=False))
  patch_size = abstract_model.patch_size
  num_patches = abstract_model.num_patches
  model_meta = {"model_name": config.model, "model_kwargs": plan.model_config.to_dict()}

  # ===================================== Reconstruction figure =================================
  # The held-out images are read now, so a bad eval split stops the run before any compute.
  recon_every = config.get("recon_every_steps", 0) or 0
  figure = None
  if recon_every > 0 or config.get("recon_at_end", True):
    figure = _ReconstructionFigure(config, workdir_path, graphdef, patch_size, num_patches,
                                   repl, writer, is_chief)

  # ===================================== Schedule and optimizer ================================
  schedule = make_schedule(config, total_steps, warmup_steps)
  tx = optim.make_optimizer(config, schedule, abstract_params)
  opt_sh = sharding_lib.opt_state_shardings(tx, abstract_params, param_sh, mesh)
  logging.info("%d steps (%.1f epochs of %s examples at global batch %d), warmup %.1f steps, "
               "peak lr %.3g.", total_steps, total_steps / steps_per_epoch if n_examples else float("nan"),
               n_examples, config.batch_size, warmup_steps,
               optim.peak_learning_rate(config.blr, config.batch_size))

  # ===================================== Initialise or resume ==================================
  ckpt_mgr = checkpoints.create_manager(workdir, max_to_keep=config.get("keep_checkpoints", 3),
                                        async_save=config.get("async_checkpointing", True))
  latest = ckpt_mgr.latest_step()
  if latest is not None:
    params, opt_state, rest, meta = _restore(ckpt_mgr, latest, create_model, param_sh, rest_sh,
                                             tx, opt_sh)
    start_step = int(meta.get("step", latest))
    if meta.get("seed", config.seed) != config.seed or meta.get("batch_size",
                                                                config.batch_size) != config.batch_size:
      logging.warning("Resuming step %d written with seed=%s batch_size=%s, now seed=%s batch_size=%s: "
                      "the continuation will not match the original run.", start_step, meta.get("seed"),
                      meta.get("batch_size"), config.seed, config.batch_size)
    logging.info("Resumed from %s at step %d.", ckpt_mgr.directory, start_step)
  else:
    def init():
      _, p, r = nnx.split(create_model(), nnx.Param, ...)
      return p, r
    params, rest = jax.jit(init, out_shardings=(param_sh, rest_sh))()
    if init_from:
      model = nnx.merge(graphdef, params, rest)
      meta = checkpoints.load_into(init_from, model)
      _, params, rest = nnx.split(model, nnx.Param, ...)
      logging.info("Initialised the weights from %s (%s, step %s).", init_from,
                   meta.get("model_name"), meta.get("step"))
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    start_step = 0

  # ===================================== The step ==============================================
  noise_key = jax.random.fold_in(jax.random.key(config.seed), _MASKING_STREAM)
  accum = config.grad_accum_steps
  batch_size = config.batch_size

  def loss_fn(p, r, images, noise):
    loss, _, _ = nnx.merge(graphdef, p, r)(images, noise=noise)
    return loss

  if config.get("remat", False):
    # Keep only weight-matmul outputs; recompute convs, norms, activations and attention.
    loss_fn = jax.checkpoint(loss_fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  grad_fn = jax.value_and_grad(loss_fn)

  def train_step(p, opt, r, images, step):
    noise = jax.random.uniform(jax.random.fold_in(noise_key, step), (batch_size, num_patches),
                               jnp.float32)
    noise = jax.lax.with_sharding_constraint(noise, batch_sh)
    if accum == 1:
      loss, grads = grad_fn(p, r, images, noise)
    else:
      # Micro-batch k = rows k, k+accum, ...: every device keeps its own rows (no resharding).
      micro_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
          None, sharding_lib.BATCH_AXES))
      split = lambda x: jax.lax.with_sharding_constraint(
          jnp.swapaxes(x.reshape((batch_size // accum, accum) + x.shape[1:]), 0, 1), micro_sh)

      def body(carry, xs):
        loss_sum, grad_sum = carry
        l, g = grad_fn(p, r, *xs)
        return (loss_sum + l, jax.tree.map(jnp.add, grad_sum, g)), None

      zeros = jax.tree.map(jnp.zeros_like, p)
      (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                      (split(images), split(noise)))
      loss = loss / accum
      grads = jax.tree.map(lambda g: g / accum, grads)
    updates, opt = tx.update(grads, opt, p)
    p = optax.apply_updates(p, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(step)}
    return p, opt, metrics

  train_step = jax.jit(train_step, in_shardings=(param_sh, opt_sh, rest_sh, batch_sh, repl),
                       out_shardings=(param_sh, opt_sh, repl), donate_argnums=(0, 1))

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
  batches = input_pipeline.DevicePrefetcher(host_iter, batch_sh, prefetch=config.get("prefetch", 2))

  # ===================================== The loop ==============================================
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  pending: list[tuple[int, dict]] = []   # metrics still on the devices
  window: list[dict] = []                # fetched metrics since the last log line
  window_start, window_first_step = time.perf_counter(), start_step
  core_hours = 0.0

  def fetch_pending():
    """Fetches the metrics since the last fetch; stops loudly at the first non-finite loss."""
    for s, m in jax.device_get(pending):
      if not np.isfinite(m["loss"]):
        raise FloatingPointError(
            f"Loss is {float(m['loss'])} at step {s} (grad norm {float(m['grad_norm'])}, lr "
            f"{float(m['learning_rate']):.3g}); stopping. The last checkpoint is step "
            f"{ckpt_mgr.latest_step()} in {ckpt_mgr.directory}; lower config.blr, or use "
            "config.dtype='float32' if it was bfloat16.")
      window.append(m)
    pending.clear()

  logging.info("Training steps %d..%d of %d (global batch %d).", start_step + 1, end_step,
               total_steps, batch_size)
  stop = _StopRequest()
  try:
    stop.__enter__()
    for step in range(start_step, end_step):
      done = step + 1                    # updates finished after this iteration
      images = next(batches)
      params, opt_state, metrics = train_step(params, opt_state, rest, images, np.int32(step))
      pending.append((done, metrics))
      if step == start_step:             # keep compilation out of the throughput figures
        jax.block_until_ready(metrics)
        logging.info("First step (with compilation) finished after %.1f s.",
                     time.perf_counter() - window_start)
        window_start, window_first_step = time.perf_counter(), done
      report(done)
      result.stopped_by = stop.requested(done, ckpt_mgr)
      result.step = done
      is_last = done == end_step or result.stopped_by is not None

      if done % config.log_every_steps == 0 or is_last:
        fetch_pending()
        elapsed = time.perf_counter() - window_start
        steps_timed = done - window_first_step
        core_hours += elapsed * num_devices / 3600.0
        scalars = {
            "loss": float(np.mean([m["loss"] for m in window])),
            "learning_rate": float(window[-1]["learning_rate"]),
            "grad_norm": float(np.mean([m["grad_norm"] for m in window])),
            "core_hours": core_hours,
        }
        if n_examples:
          scalars["epoch"] = done / steps_per_epoch
        eta = float("nan")
        if steps_timed > 0 and elapsed > 0:
          img_s = steps_timed * batch_size / elapsed
          eta = (total_steps - done) * batch_size / img_s
          scalars.update(images_per_sec=img_s, images_per_sec_per_device=img_s / num_devices,
                         eta_hours=eta / 3600.0)
        writer.write_scalars(done, scalars)
        logging.info("step %d/%d | loss %.4f | lr %.3g | grad_norm %.3f | %.1f img/s "
                     "(%.1f/device) | eta %s", done, total_steps, scalars["loss"],
                     scalars["learning_rate"], scalars["grad_norm"],
                     scalars.get("images_per_sec", float("nan")),
                     scalars.get("images_per_sec_per_device", float("nan")), _format_eta(eta))
        result.losses[done] = scalars["loss"]
        window.clear()
        window_start, window_first_step = time.perf_counter(), done

      if done % config.checkpoint_every_steps == 0 or is_last:
        fetch_pending()                  # never checkpoint past a non-finite loss
        meta = {**model_meta, "step": done, "seed": config.seed, "batch_size": batch_size,
                "data_position": done, "dataset": config.dataset, "total_steps": total_steps}
        model_state = _deep_merge(nnx.to_pure_dict(params), nnx.to_pure_dict(rest))
        ckpt_mgr.save(done, args=ocp.args.Composite(**{
            checkpoints.MODEL_ITEM: ocp.args.StandardSave(model_state),
            checkpoints.OPT_STATE_ITEM: ocp.args.StandardSave(opt_state),
            checkpoints.META_ITEM: ocp.args.JsonSave(meta),
        }), force=True)

      if figure is not None and ((recon_every > 0 and done % recon_every == 0) or
                                 (is_last and config.get("recon_at_end", True))):
        figure.write(done, params, rest)
      if result.stopped_by is not None:
        break
  finally:
    stop.__exit__()
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


def _restore(ckpt_mgr, step, create_model, param_sh, rest_sh, tx, opt_sh):
  """Restores params, optimizer state, the rest of the model state and meta of ``step``."""
  abstract = nnx.eval_shape(create_model)
  _, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
  pure_p = sharding_lib.abstract_with_shardings(nnx.to_pure_dict(abs_params),
                                                nnx.to_pure_dict(param_sh))
  pure_r = sharding_lib.abstract_with_shardings(nnx.to_pure_dict(abs_rest),
                                                nnx.to_pure_dict(rest_sh))
  abs_opt = sharding_lib.abstract_with_shardings(jax.eval_shape(tx.init, abs_params), opt_sh)
  restored = ckpt_mgr.restore(step, args=ocp.args.Composite(**{
      checkpoints.MODEL_ITEM: ocp.args.StandardRestore(_deep_merge(pure_p, pure_r)),
      checkpoints.OPT_STATE_ITEM: ocp.args.StandardRestore(abs_opt),
      checkpoints.META_ITEM: ocp.args.JsonRestore(),
  }))
  model_pure = restored[checkpoints.MODEL_ITEM]
  nnx.replace_by_pure_dict(abs_params, _select(model_pure, nnx.to_pure_dict(abs_params)))
  nnx.replace_by_pure_dict(abs_rest, _select(model_pure, nnx.to_pure_dict(abs_rest)))
  return abs_params, restored[checkpoints.OPT_STATE_ITEM], abs_rest, dict(restored[checkpoints.META_ITEM])


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
        jax.random.fold_in(jax.random.key(config.seed), _FIGURE_STREAM),
        (self.images.shape[0], num_patches), jnp.float32)

    def predict(p, r, images):
      _, pred, mask = nnx.merge(graphdef, p, r)(images, noise=noise)
      return pred.astype(jnp.float32), mask.astype(jnp.float32)

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
