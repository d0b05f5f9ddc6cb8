"""``config.job = "evaluate"``: top-1 / top-5 / loss of a classifier checkpoint on a split, printed
and written to ``{workdir}/eval_{split}.json``. No training, so no loop: the checks the training
jobs make, then one pass of the evaluator's step over the split."""

from __future__ import annotations

import json

import jax
from absl import logging
from etils import epath
from flax import nnx

from convmae_jax import models, weights
from convmae_jax.train import logs, validation, xla_cpu
from convmae_jax.train import sharding as sharding_lib
from convmae_jax.train import workdir as workdir_lib
from convmae_jax.train.evaluators.classification import eval_metrics_fn, evaluate_model
from convmae_jax.train.jobs.classify import check_labels_and_init, open_eval_data, read_init
from convmae_jax.train.loop import TrainResult


def run(config, workdir: str) -> TrainResult:
  """Scores ``config.init_from`` on ``config.eval_split``; the result's ``metrics[0]``."""
  plan = validation.validate_classification_config(config)
  logs.quiet_library_logs()
  workdir_lib.check_workdir(workdir)
  init_from = check_labels_and_init(config, plan)
  workdir_path = epath.Path(workdir)
  mesh = sharding_lib.make_mesh(*plan.mesh_shape)
  eval_data = open_eval_data(config)
  sd = read_init(config, plan, init_from, expect="classifier")
  model = models.create(config.model, rngs=nnx.Rngs(config.seed), **plan.model_overrides)
  report = weights.init_classifier(model, sd, expect="classifier")
  if jax.process_index() == 0:
    workdir_path.mkdir(parents=True, exist_ok=True)
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  repl = sharding_lib.replicated(mesh)
  params, rest = jax.device_put((params, rest), repl)
  batch_sh = sharding_lib.batch_sharding(mesh)
  options, line = xla_cpu.choose(config, plan.model_config, plan.mesh_shape, forward_only=True,
                                 batch_size=config.eval_batch_size)
  logging.info("Evaluation: %s.", line)
  eval_step = jax.jit(eval_metrics_fn(graphdef), out_shardings=repl, compiler_options=options)
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
