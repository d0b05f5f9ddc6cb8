"""Optimizer of the pretraining recipe: AdamW, the official weight-decay set and the lr schedule.

Recipe (the official ``util/lr_sched.py``): lr = blr * global_batch / 256, linear warmup from 0
over ``warmup_epochs`` then a half-cosine to ``min_lr``, both per step (fractional epochs); AdamW with
betas (0.9, 0.95) and weight decay 0.05 on every parameter with >= 2 dimensions (conv and linear
kernels, depthwise kernels and ``mask_token``); 1-D parameters (biases, LayerNorm scales) are not
decayed. Frozen position embeddings are not ``nnx.Param`` and never reach the optimizer.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def peak_learning_rate(blr: float, global_batch_size: int) -> float:
  """Absolute peak lr from the base lr: ``blr * global_batch_size / 256`` (the linear scaling rule)."""
  return blr * global_batch_size / 256.0


def warmup_cosine_schedule(*, peak_lr: float, warmup_steps: float, total_steps: int,
                           min_lr: float = 0.0) -> Callable[[Any], jax.Array]:
  """lr(step): ``peak*step/warmup`` for step < warmup (0 at step 0), then
  ``min_lr + (peak - min_lr) * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))``.

  ``warmup_steps`` may be fractional (warmup_epochs * steps_per_epoch), as in the official code where
  the lr is set from the fractional epoch ``step / len(loader)``. Steps past ``total_steps`` stay at
  ``min_lr``.
  """
  warmup = float(warmup_steps)
  decay = max(float(total_steps) - warmup, 1.0)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak_lr * step / max(warmup, 1e-12)
    progress = jnp.clip((step - warmup) / decay, 0.0, 1.0)
    cosine = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(step < warmup, warm, cosine)

  return schedule


def weight_decay_mask(params: Any) -> Any:
  """True for the parameters that are decayed: every one with ndim >= 2 (the official set)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config, schedule: Callable[[Any], jax.Array],
                   params: Any) -> optax.GradientTransformation:
  """AdamW(b1, b2, eps) with decoupled weight decay ``config.weight_decay`` on the official set.

  ``params`` may be abstract (shapes only); only its tree structure and ndims are used. No gradient
  clipping: the official recipe computes the grad norm only for logging.
  """
  return optax.adamw(
      learning_rate=schedule,
      b1=config.b1,
      b2=config.b2,
      eps=config.get("adam_eps", 1e-8),
      weight_decay=config.weight_decay,
      mask=weight_decay_mask(params),
  )
