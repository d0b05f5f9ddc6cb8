"""The training step, written once for every job: ``build_train_step`` turns a job's loss into the
jitted, sharded, donated ``(params, opt_state, rest, batch, step) -> (params, opt_state, rest,
metrics)``, with gradient accumulation, remat, the model's dropout streams reseeded from the step,
and the non-finite skip."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from convmae_jax import data
from convmae_jax.train import sharding as sharding_lib
from convmae_jax.train.metrics import BAD_METRIC
from convmae_jax.train.rng import DROPOUT_STREAM, reseed_all, stream_key
from convmae_jax.train.sharding import StateShardings

# loss_fn(model, batch) -> (scalar loss, {name: scalar}): the model is the merged NNX module, batch
# a dict of this (micro-)batch's arrays. prepare(batch, step) -> batch runs first on the whole global
# batch (masking noise, mixup), so gradient accumulation sees exactly the rows of the full batch.
LossFn = Callable[[nnx.Module, Mapping[str, jax.Array]], tuple[jax.Array, dict]]
PrepareFn = Callable[[dict, jax.Array], dict]


def build_train_step(*, graphdef, param_filter, loss_fn: LossFn, tx: optax.GradientTransformation,
                     schedule, shardings: StateShardings, batch_size: int, grad_accum_steps: int = 1,
                     remat: bool = False, seed: int, batch_keys: tuple[str, ...] = ("image",),
                     prepare: PrepareFn | None = None, skip_nonfinite: bool = False,
                     make_tx: Callable[[Callable], optax.GradientTransformation] | None = None,
                     compiler_options: Mapping[str, Any] | None = None):
  """The jitted training step ``(params, opt_state, rest, batch, step) -> (params, opt_state, rest,
  metrics)``.

  * ``params`` are the model's variables matched by ``param_filter`` (the trainable ones), ``rest``
    everything else (frozen weights, position embeddings, BatchNorm statistics, RNG state); both are
    merged with ``graphdef`` inside. ``rest`` comes back updated (BatchNorm statistics).
  * ``prepare(batch, step)`` adds the step's random inputs to the whole batch; it takes its keys from
    :func:`stream_key` folded with ``step``.
  * Every RNG stream of the model (drop path's) is reseeded from
    ``fold_in(fold_in(key(seed), DROPOUT_STREAM), step)`` (then the micro-batch index), so drop path
    draws new masks at every step and the same masks when a resumed run repeats a step.
  * ``grad_accum_steps > 1``: micro-batch ``k`` takes rows ``k, k+accum, ...`` so every device keeps
    its own rows; gradients, losses and ``loss_fn``'s scalars are averaged. ``remat``: keep only
    weight-matmul outputs and recompute convs, norms, activations and attention in the backward pass.
  * metrics: ``loss``, ``grad_norm``, ``learning_rate``, ``skipped`` and ``loss_fn``'s own scalars;
    with a ``bad`` batch feature (examples the data pipeline replaced), ``bad_examples``: how many
    of the global batch were bad (the same number on every process).
  * ``skip_nonfinite``: a step whose loss or gradient norm is not finite changes nothing
    (parameters, optimizer state and statistics keep their values; ``skipped`` = 1), so no
    non-finite value ever reaches the state or a checkpoint.
  * ``make_tx(schedule) -> tx`` (optional, with a ``schedule`` that has ``hparams()``, such as
    :class:`optim.WarmupCosine`): the optimizer is rebuilt inside the step around the schedule
    evaluated on its numbers passed as an argument, so the compiled program holds no lr, warmup or
    run length and is shared (persistent compilation cache) by runs that differ only in those.
    Without it, ``tx`` and ``schedule`` are used as given (their numbers are compiled in).
  * ``compiler_options``: XLA options for this program alone (``jax.jit``'s), e.g. the CPU matrix
    product library of :mod:`xla_cpu`.
  Parameters, optimizer state and ``rest`` are donated.
  """
  accum = int(grad_accum_steps)
  dropout_key = stream_key(seed, DROPOUT_STREAM)
  batch_sh = {k: shardings.batch for k in batch_keys}

  def compute(p, r, batch, drop_key):
    # copy=True: fresh Variables in this trace, so drop path may advance its RNG counters and
    # BatchNorm update its statistics under value_and_grad.
    model = nnx.merge(graphdef, p, r, copy=True)
    reseed_all(model, drop_key)
    loss, aux = loss_fn(model, batch)
    _, _, new_r = nnx.split(model, param_filter, ...)
    return loss, (aux, new_r)

  if remat:
    compute = jax.checkpoint(compute, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  grad_fn = jax.value_and_grad(compute, has_aux=True)

  def train_step(p, opt, r, batch, step, hparams):
    lr_fn, step_tx = schedule, tx
    if make_tx is not None:
      lr_fn = lambda count: schedule(count, hparams)
      step_tx = make_tx(lr_fn)
    r_in = r
    drop_key = jax.random.fold_in(dropout_key, step)
    batch = dict(batch)
    bad = batch.pop(data.BAD_KEY, None)   # examples the data pipeline had to replace
    if prepare is not None:
      batch = prepare(dict(batch), step)
    if accum == 1:
      (loss, (aux, r)), grads = grad_fn(p, r, batch, drop_key)
    else:
      micro_sh = jax.sharding.NamedSharding(shardings.mesh, jax.sharding.PartitionSpec(
          None, sharding_lib.BATCH_AXES))
      split = lambda x: jax.lax.with_sharding_constraint(
          jnp.swapaxes(x.reshape((batch_size // accum, accum) + x.shape[1:]), 0, 1), micro_sh)
      micro = jax.tree.map(split, batch)

      def body(carry, xs):
        loss_sum, aux_sum, grad_sum, r_c = carry
        k, mb = xs
        (l, (a, r_c)), g = grad_fn(p, r_c, mb, jax.random.fold_in(drop_key, k))
        return (loss_sum + l, jax.tree.map(jnp.add, aux_sum, a), jax.tree.map(jnp.add, grad_sum, g),
                r_c), None

      first = jax.tree.map(lambda x: x[0], micro)
      aux_shape = jax.eval_shape(lambda: compute(p, r, first, drop_key)[1][0])
      init = (jnp.zeros((), jnp.float32), jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), aux_shape),
              jax.tree.map(jnp.zeros_like, p), r)
      (loss, aux, grads, r), _ = jax.lax.scan(body, init, (jnp.arange(accum), micro))
      loss = loss / accum
      aux = jax.tree.map(lambda a: a / accum, aux)
      grads = jax.tree.map(lambda g: g / accum, grads)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = step_tx.update(grads, opt, p)
    new_p = optax.apply_updates(p, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      keep = lambda new, old: jnp.where(ok, new, old) if jnp.issubdtype(new.dtype, jnp.floating) \
          else new
      new_p = jax.tree.map(keep, new_p, p)
      new_opt = jax.tree.map(keep, new_opt, opt)
      r = jax.tree.map(keep, r, r_in)
    metrics = {**aux, "loss": loss, "grad_norm": grad_norm, "learning_rate": lr_fn(step),
               "skipped": 1.0 - ok.astype(jnp.float32)}
    if bad is not None:
      metrics[BAD_METRIC] = jnp.sum(bad.astype(jnp.int32))
    return new_p, new_opt, r, metrics

  jitted = jax.jit(train_step,
                   in_shardings=(shardings.params, shardings.opt_state, shardings.rest, batch_sh,
                                 shardings.replicated, shardings.replicated),
                   out_shardings=(shardings.params, shardings.opt_state, shardings.rest,
                                  shardings.replicated),
                   donate_argnums=(0, 1, 2), compiler_options=compiler_options or None)
  hparams = schedule.hparams() if make_tx is not None else {}

  def run(p, opt, r, batch, step):
    return jitted(p, opt, r, batch, step, hparams)

  # The step's lowered program, for inspection (benchmarks hash it):
  # run.lower(p, opt, r, batch, step).
  run.lower = lambda p, opt, r, batch, step: jitted.lower(p, opt, r, batch, step, hparams)
  return run
