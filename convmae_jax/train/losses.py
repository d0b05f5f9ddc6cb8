"""Classification losses and accuracy of the fine-tuning / linear-probe recipes (timm 0.3.2).

All losses are per example, (N,) float32 (the caller takes the mean), computed from float32
log-probabilities whatever the logits' dtype.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def smoothed_one_hot(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
  """(N,) int → (N, num_classes) float32: ``off = smoothing / num_classes`` everywhere and
  ``on = 1 - smoothing + off`` at the label (timm ``mixup_target``'s one-hot); rows sum to 1."""
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return hot * (on - off) + off


def _log_probs(logits: jax.Array) -> jax.Array:
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """timm ``SoftTargetCrossEntropy`` per example: ``sum_c -t_c * log_softmax(logits)_c``.

  logits: (N, C); targets: (N, C) probabilities (e.g. from Mixup). Returns (N,) float32.
  """
  return jnp.sum(-targets.astype(jnp.float32) * _log_probs(logits), axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """``-log_softmax(logits)[label]`` per example. logits (N, C), labels (N,) int → (N,) float32."""
  logp = _log_probs(logits)
  return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def label_smoothing_cross_entropy(logits: jax.Array, labels: jax.Array,
                                  smoothing: float = 0.1) -> jax.Array:
  """timm ``LabelSmoothingCrossEntropy`` per example:
  ``(1 - s) * nll + s * mean_c(-log_softmax(logits)_c)``. Equals :func:`soft_target_cross_entropy`
  with ``smoothed_one_hot(labels, C, s)``. Returns (N,) float32."""
  logp = _log_probs(logits)
  nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return (1.0 - smoothing) * nll + smoothing * -jnp.mean(logp, axis=-1)


def topk_correct(logits: jax.Array, labels: jax.Array,
                 ks: Sequence[int] = (1, 5)) -> dict[str, jax.Array]:
  """Per-example top-k hits: ``{"top1": (N,) float32 0/1, "top5": ...}``, one key per k.

  The label counts as in the top k when fewer than k classes rank above it, where class j ranks
  above the label y when ``logit_j > logit_y``, or ties with it and ``j < y``. That is
  ``jax.lax.top_k`` (and a stable descending sort): ties go to the lower class index;
  ``torch.topk`` leaves the order of ties unspecified, so results can differ from PyTorch only on
  exact ties. A k >= num_classes is always a hit (k clamps to the number of classes).
  """
  if any(int(k) < 1 for k in ks):
    raise ValueError(f"topk_correct: every k must be >= 1, got ks={tuple(ks)}")
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  c = logits.shape[-1]
  target = jnp.take_along_axis(logits, labels[:, None], axis=-1)  # (N, 1)
  idx = jnp.arange(c)[None, :]
  above = (logits > target) | ((logits == target) & (idx < labels[:, None]))
  rank = jnp.sum(above, axis=-1)  # 0-based position of the label in the top-k order
  return {f"top{k}": (rank < min(int(k), c)).astype(jnp.float32) for k in ks}
