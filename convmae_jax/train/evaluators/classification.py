"""Top-1 / top-5 / loss of a classifier on a labelled split, summed over every batch on the devices;
during training, with the best model so far kept as a model-only checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from convmae_jax.train import losses
from convmae_jax.train import sharding as sharding_lib
from convmae_jax.train.evaluators.best import BestModelEvaluator

EVAL_KEYS = ("image", "label", "valid")


def eval_metrics_fn(graphdef_eval):
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


class TopKEvaluator(BestModelEvaluator):
  """Evaluates every ``every_steps`` steps (0: at the end only) and at the last step; writes
  ``eval_top1``, ``eval_top5``, ``eval_loss``, ``eval_num_examples``; keeps the best model (by top-1)
  in ``best_dir`` with ``best_meta`` and the evaluation in its meta. The best top-1 so far travels
  in the training checkpoints (``best_top1``)."""

  meta_key = "best_top1"

  def __init__(self, *, eval_data, split: str, every_steps: int, graphdef_eval, shardings, writer,
               best_dir, best_meta: dict, compiler_options=None):
    super().__init__(eval_data=eval_data, every_steps=every_steps, graphdef_eval=graphdef_eval,
                     shardings=shardings, writer=writer, best_dir=best_dir, best_meta=best_meta)
    self.description = f"evaluating on {eval_data.num_examples} examples of {split!r} {self.period()}"
    self.eval_step = jax.jit(
        eval_metrics_fn(graphdef_eval),
        in_shardings=(shardings.params, shardings.rest, {k: shardings.batch for k in EVAL_KEYS}),
        out_shardings=shardings.replicated, compiler_options=compiler_options)

  def __call__(self, step: int, params, rest) -> dict[str, float]:
    evaluated = evaluate_model(self.eval_step, params, rest, self.eval_data, self.batch_sharding)
    self.writer.write_scalars(step, {f"eval_{k}": v for k, v in evaluated.items()})
    improved = self.improves(evaluated["top1"])
    logging.info("eval step %d | top1 %.2f%% | top5 %.2f%% | loss %.4f | %d examples%s",
                 step, evaluated["top1"], evaluated["top5"], evaluated["loss"],
                 evaluated["num_examples"], " | best so far" if improved else "")
    if improved:
      self.keep_best(step, params, rest, evaluated)
    return evaluated
