"""Fine-tuning, linear probing and evaluation of a ConvViT classifier: ``run(config, workdir)``.

One loop for the two training recipes, on the shared core (``core.py``), chosen by ``config.job``:

* ``finetune`` (official ``main_finetune.py``): every weight trains; AdamW with layer-wise lr decay
  and the official weight-decay groups; drop path; mixup/cutmix with label-smoothed soft targets;
  RandAugment and random erasing in the data pipeline.
* ``linprobe`` (official ``main_linprobe.py``): the encoder is frozen (not differentiated, so its
  backward pass is never computed); BatchNorm without affine + a linear head train with LARS.
* ``evaluate``: top-1 / top-5 / loss of a classifier checkpoint on a split, printed and written
  to ``{workdir}/eval_{split}.json``.

Phases, in order: checks (no compute) -> mesh, model, optimizer, shardings -> initialise (from
``config.init_from``) or resume -> the jitted train and eval steps -> data -> the loop (metrics,
checkpoints, evaluation every ``eval_every_steps`` with the best checkpoint kept in
``{workdir}/best``) -> final evaluation.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from convmae_jax import checkpoints, data, models, weights
from convmae_jax.data import classification as cls_data
from convmae_jax.train import core, input_pipeline, losses, mixup, optim, peers
from convmae_jax.train import sharding as sharding_lib
from convmae_jax.train import validation
from convmae_jax.train.errors import ConfigError
from convmae_jax.train.trainer import TrainResult

BEST_SUBDIR = "best"
_HEAD_INIT_STREAM = 5


def _trainable_filter(job: str):
  """Fine-tuning trains every nnx.Param; the linear probe only the head."""
  if job == "linprobe":
    return nnx.All(nnx.Param, lambda path, _: len(path) > 0 and path[0] == "head")
  return nnx.Param


def _eval_metrics_fn(graphdef_eval):
  """(params, rest, batch) -> summed {"top1", "top5", "loss", "count"} over valid rows."""

  def eval_step(p, r, batch):
    logits = nnx.merge(graphdef_eval, p, r)(batch["image"])
    valid = batch["valid"]
    correct = losses.topk_correct(logits, batch["label"], ks=(1, 5))
    ce = losses.cross_entropy(logits, batch["label"])
    return {"top1": jnp.sum(correct["top1"] * valid), "top5": jnp.sum(correct["top5"] * valid),
            "loss": jnp.sum(ce * valid), "count": jnp.sum(valid)}

  return eval_step


def evaluate_model(eval_step, params, rest, eval_data, batch_sharding) -> dict[str, float]:
  """Runs ``eval_step`` over every batch of ``eval_data``; top1/top5 in percent, mean loss."""
  sums = None
  for batch in eval_data:
    arrays = {k: sharding_lib.to_global_array(np.asarray(v), batch_sharding) for k, v in batch.items()}
    out = eval_step(params, rest, arrays)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  n = float(sums["count"])
  return {"top1": 100.0 * float(sums["top1"]) / n, "top5": 100.0 * float(sums["top5"]) / n,
          "loss": float(sums["loss"]) / n, "num_examples": int(round(n))}


def run(config, workdir: str, *, on_log=None) -> TrainResult:
  """Runs ``config.job`` ("finetune", "linprobe" or "evaluate") in ``workdir``."""
  # ===================================== Config checks (no compute) ============================
  job = config.job
  plan = validation.validate_classification_config(config)
  core.quiet_library_logs()
  core.check_workdir(workdir)
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
  if job == "evaluate":
    return _evaluate_job(config, workdir, plan, init_from)
  # The initial weights are read and checked against the model now (kind, shapes, position
  # embedding), unless the workdir already has a checkpoint to resume from.
  init_sd = None
  if init_from and checkpoints.latest_step(workdir) is None:
    init_sd = _read_init(config, plan, init_from, expect="pretraining")

  n_examples, total_steps, warmup_steps, steps_per_epoch = core.resolve_schedule(config)
  end_step = core.end_step(config, total_steps)

  # ===================================== Writers and mesh ======================================
  workdir_path, writer, mesh = core.open_workdir(config, workdir, plan.mesh_shape)

  # ===================================== Model, optimizer, shardings ===========================
  def create_model():
    return models.create(config.model, rngs=nnx.Rngs(config.seed), **plan.model_overrides)

  trainable = _trainable_filter(job)
  abstract_model = nnx.eval_shape(create_model)
  graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, trainable, ...)
  abstract_model.eval()
  graphdef_eval, _, _ = nnx.split(abstract_model, trainable, ...)
  core.write_parameter_table(workdir_path, abstract_params, config.model, plan.model_config)
  schedule = core.make_schedule(config, total_steps, warmup_steps)
  if job == "finetune":
    tx = optim.make_finetune_optimizer(config, schedule, abstract_params)
  else:
    tx = optim.make_lars_optimizer(config, schedule, abstract_params)
  sh = core.state_shardings(mesh, abstract_params, abstract_rest, tx)
  model_meta = {"model_name": config.model, "model_kwargs": plan.model_config.to_dict()}
  logging.info("%d steps (%.1f epochs of %s examples at global batch %d), warmup %.1f steps, "
               "peak lr %.3g.", total_steps, total_steps / steps_per_epoch if n_examples else float("nan"),
               n_examples, config.batch_size, warmup_steps,
               optim.peak_learning_rate(config.blr, config.batch_size))

  # The evaluation data is opened now, so a bad split stops the run before any compute.
  eval_data = cls_data.create_eval_dataset(
      config.dataset, split=config.eval_split, global_batch_size=config.eval_batch_size,
      image_size=config.image_size, crop_pct=config.crop_pct, data_dir=data_dir,
      num_examples=config.eval_num_examples if config.eval_num_examples > 0 else None)

  # ===================================== Initialise or resume ==================================
  ckpt_mgr = core.open_checkpoints(config, workdir)

  def restore(mgr, step):
    # The config must fit the checkpoint (checked on its meta alone, before any array is read).
    validation.check_resume(core.read_train_meta(mgr, step), config, plan.model_config, mgr.directory)
    a_model = nnx.eval_shape(create_model)
    _, a_params, a_rest = nnx.split(a_model, trainable, ...)
    return core.restore_train_state(mgr, step, a_params, a_rest, sh, tx)

  try:
    ckpt_mgr, latest, restored = core.restore_readable(config, workdir, ckpt_mgr, restore)
  except validation.ConfigError:
    ckpt_mgr.close()
    raise
  best_top1 = -1.0
  bad_examples = 0                   # undecodable examples read so far (all runs of this workdir)
  if latest is not None:
    params, opt_state, rest, meta = restored
    start_step = int(meta.get("step", latest))
    best_top1 = float(meta.get("best_top1", -1.0))
    bad_examples = int(meta.get("bad_examples", 0))
    logging.info("Resumed from %s at step %d.", ckpt_mgr.directory, start_step)
  else:
    def init():
      _, p, r = nnx.split(create_model(), trainable, ...)
      return p, r
    params, rest = jax.jit(init, out_shardings=(sh.params, sh.rest))()
    if init_from:
      model = nnx.merge(graphdef, params, rest)
      head_std = config.head_init_std if config.head_init_std > 0 else None
      try:
        report = weights.init_classifier(
            model, init_sd, head_std=head_std, expect="pretraining",
            key=core.stream_key(config.seed, _HEAD_INIT_STREAM))
      except (ValueError, FileNotFoundError) as e:
        ckpt_mgr.close()
        raise ConfigError(f"config.init_from={init_from!r}: {e}") from None
      _, params, rest = nnx.split(model, trainable, ...)
      logging.info("Initialised the encoder from %s (%s checkpoint, %d tensors; position embedding "
                   "resized %s).", init_from, report["kind"], report["loaded"],
                   report["pos_embed_resized"] or "no")
    else:
      logging.warning("config.init_from is empty: training from random initialisation.")
    opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(params)
    start_step = 0

  # ===================================== The steps =============================================
  num_classes = plan.model_config.num_classes
  batch_size = config.batch_size
  use_mixup = job == "finetune" and config.mixup_prob > 0 and (config.mixup > 0 or config.cutmix > 0)
  smoothing = config.label_smoothing if job == "finetune" else 0.0
  mix_key = core.stream_key(config.seed, core.MIXUP_STREAM)

  def prepare(batch, step):
    if use_mixup:
      images, targets, _ = mixup.mixup_cutmix(
          jax.random.fold_in(mix_key, step), batch["image"], batch["label"],
          num_classes=num_classes, mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
          switch_prob=config.mixup_switch_prob, prob=config.mixup_prob,
          label_smoothing=smoothing)
    else:
      images = batch["image"]
      targets = losses.smoothed_one_hot(batch["label"], num_classes, smoothing)
    return {"image": images, "target": jax.lax.with_sharding_constraint(targets, sh.batch)}

  def loss_fn(model, batch):
    logits = model(batch["image"])
    # Soft-target CE equals timm's LabelSmoothingCrossEntropy on smoothed one-hots, and plain CE
    # when smoothing is 0 (linear probe).
    return jnp.mean(losses.soft_target_cross_entropy(logits, batch["target"])), {}

  train_step = core.build_train_step(
      graphdef=graphdef, param_filter=trainable, loss_fn=loss_fn, tx=tx, schedule=schedule,
      shardings=sh, batch_size=batch_size, grad_accum_steps=config.grad_accum_steps,
      remat=config.get("remat", False), seed=config.seed,
      skip_nonfinite=config.get("nonfinite", "stop") == "skip",
      batch_keys=("image", "label", data.BAD_KEY),
      prepare=prepare)
  eval_step = jax.jit(_eval_metrics_fn(graphdef_eval),
                      in_shardings=(sh.params, sh.rest, {k: sh.batch for k in ("image", "label", "valid")}),
                      out_shardings=sh.replicated)

  # ===================================== Data ==================================================
  result = TrainResult(step=start_step, losses={}, model=None, workdir=str(workdir))
  if start_step >= end_step:
    logging.info("Nothing to do: step %d already reached (end step %d).", start_step, end_step)
    ckpt_mgr.close()
    result.model = nnx.merge(graphdef_eval, params, rest)
    return result
  host_iter = cls_data.create_train_dataset(
      config.dataset, split=config.train_split, global_batch_size=batch_size,
      image_size=config.image_size, seed=config.seed, recipe=job,
      process_index=jax.process_index(), process_count=jax.process_count(), data_dir=data_dir,
      start_step=start_step, scale=tuple(config.crop_scale),
      rand_augment=config.get("rand_augment", "") or "", reprob=config.get("reprob", 0.0))
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
  best_dir = workdir_path / BEST_SUBDIR
  eval_every = config.eval_every_steps
  logging.info("Training steps %d..%d of %d (global batch %d); evaluating on %d examples of %r "
               "every %s steps.", start_step + 1, end_step, total_steps, batch_size,
               eval_data.num_examples, config.eval_split, eval_every if eval_every > 0 else "(end only)")
  profiler = core.Profiler(config, workdir_path)
  watchdog = peers.PeerWatchdog(config.get("peer_timeout_s", 120),
                                peers.finished_steps_text(ckpt_mgr.directory))
  with watchdog:                     # a lost peer ends the run within peer_timeout_s
    try:
      with core.StopRequest() as stop:
        for step in range(start_step, end_step):
          done = step + 1
          batch = window.next_batch(batches)
          window.note_bad_examples(done, batch.get(input_pipeline.DevicePrefetcher.HOST, {}))
          params, opt_state, rest, metrics = train_step(
              params, opt_state, rest, {k: batch[k] for k in ("image", "label", data.BAD_KEY)},
              np.int32(step))
          window.add(done, metrics)
          profiler(done, metrics)
          result.stopped_by = stop.requested(done, ckpt_mgr)
          result.step = done
          is_last = done == end_step or result.stopped_by is not None

          if done % config.log_every_steps == 0 or is_last:
            result.losses[done] = window.log(done)["loss"]

          evaluated = None
          if (eval_every > 0 and done % eval_every == 0) or done == end_step:
            window.fetch()
            evaluated = evaluate_model(eval_step, params, rest, eval_data, sh.batch)
            writer.write_scalars(done, {f"eval_{k}": v for k, v in evaluated.items()})
            result.metrics[done] = evaluated
            improved = evaluated["top1"] > best_top1
            best_top1 = max(best_top1, evaluated["top1"])
            logging.info("eval step %d | top1 %.2f%% | top5 %.2f%% | loss %.4f | %d examples%s",
                         done, evaluated["top1"], evaluated["top5"], evaluated["loss"],
                         evaluated["num_examples"], " | best so far" if improved else "")
            if improved:
              _save_best(best_dir, graphdef_eval, params, rest, {
                  **model_meta, "step": done, "eval": evaluated, "eval_split": config.eval_split,
                  "dataset": config.dataset, "job": job})
            window.restart(done)

          def save():
            window.fetch()                   # never checkpoint past a non-finite loss
            meta = {**model_meta, "step": done, "seed": config.seed, "batch_size": batch_size,
                    "data_position": done, "dataset": config.dataset, "total_steps": total_steps,
                    "job": job, "best_top1": best_top1, "bad_examples": window.bad_examples}
            core.save_train_state(ckpt_mgr, done, params, rest, opt_state, meta)

          core.checkpoint_step(window, ckpt_mgr, done, save,
                               due=done % config.checkpoint_every_steps == 0 or is_last)
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

  result.model = nnx.merge(graphdef_eval, params, rest)
  if result.stopped_by is not None:
    logging.warning("Stopped by %s at step %d of %d with a checkpoint in %s; run the same command "
                    "again to resume.", result.stopped_by, result.step, total_steps,
                    workdir_path / "checkpoints")
  if result.metrics:
    last = result.metrics[max(result.metrics)]
    logging.info("Done: step %d; eval top1 %.2f%% top5 %.2f%% (best %.2f%%, weights in %s). "
                 "Checkpoints in %s, TensorBoard logs in %s.", result.step, last["top1"],
                 last["top5"], best_top1, best_dir, workdir_path / "checkpoints", workdir)
  return result


def _read_init(config, plan, init_from: str, *, expect: str) -> dict:
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


def _save_best(best_dir, graphdef_eval, params, rest, meta: dict) -> None:
  """The best model so far as a model-only checkpoint (step 0 of ``best/``), replacing the last."""
  model = nnx.merge(graphdef_eval, params, rest)
  checkpoints.save_model(best_dir, model, meta, step=0, overwrite=True)


def _evaluate_job(config, workdir: str, plan, init_from: str) -> TrainResult:
  """top-1/top-5/loss of a classifier checkpoint; printed and written as JSON into ``workdir``."""
  workdir_path = epath.Path(workdir)
  mesh = sharding_lib.make_mesh(*plan.mesh_shape)
  data_dir = config.get("data_dir") or None
  eval_data = cls_data.create_eval_dataset(
      config.dataset, split=config.eval_split, global_batch_size=config.eval_batch_size,
      image_size=config.image_size, crop_pct=config.crop_pct, data_dir=data_dir,
      num_examples=config.eval_num_examples if config.eval_num_examples > 0 else None)
  sd = _read_init(config, plan, init_from, expect="classifier")
  model = models.create(config.model, rngs=nnx.Rngs(config.seed), **plan.model_overrides)
  report = weights.init_classifier(model, sd, expect="classifier")
  if jax.process_index() == 0:
    workdir_path.mkdir(parents=True, exist_ok=True)
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  repl = sharding_lib.replicated(mesh)
  params, rest = jax.device_put((params, rest), repl)
  batch_sh = sharding_lib.batch_sharding(mesh)
  eval_step = jax.jit(_eval_metrics_fn(graphdef), out_shardings=repl)
  metrics = evaluate_model(eval_step, params, rest, eval_data, batch_sh)
  out = {**metrics, "dataset": config.dataset, "split": config.eval_split,
         "checkpoint": init_from, "model_name": config.model,
         "model_kwargs": plan.model_config.to_dict(), "image_size": config.image_size,
         "crop_pct": config.crop_pct, "pos_embed_resized": report["pos_embed_resized"]}
  path = workdir_path / f"eval_{config.eval_split.replace('/', '_')}.json"
  if jax.process_index() == 0:
    path.write_text(json.dumps(out, indent=2))
  logging.info("eval %s on %s %s: top1 %.2f%% | top5 %.2f%% | loss %.4f | %d examples -> %s",
               init_from, config.dataset, config.eval_split, metrics["top1"], metrics["top5"],
               metrics["loss"], metrics["num_examples"], path)
  print(json.dumps({k: out[k] for k in ("top1", "top5", "loss", "num_examples")}))
  result = TrainResult(step=0, losses={}, model=model, workdir=str(workdir))
  result.metrics[0] = metrics
  return result
