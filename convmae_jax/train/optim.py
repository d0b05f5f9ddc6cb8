"""Optimizers: pretraining AdamW, fine-tuning AdamW with layer-wise lr decay, linear-probe LARS.

Pretraining recipe below; the fine-tuning and linear-probe optimizers are described at
:func:`make_finetune_optimizer` and :func:`make_lars_optimizer`.

Recipe (the official ``util/lr_sched.py``): lr = blr * global_batch / 256, linear warmup from 0
over ``warmup_epochs`` then a half-cosine to ``min_lr``, both per step (fractional epochs); AdamW with
betas (0.9, 0.95) and weight decay 0.05 on every parameter with >= 2 dimensions (conv and linear
kernels, depthwise kernels and ``mask_token``); 1-D parameters (biases, LayerNorm scales) are not
decayed. Frozen position embeddings are not ``nnx.Param`` and never reach the optimizer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax


def peak_learning_rate(blr: float, global_batch_size: int) -> float:
  """Absolute peak lr from the base lr: ``blr * global_batch_size / 256`` (the linear scaling rule)."""
  return blr * global_batch_size / 256.0


@dataclasses.dataclass(frozen=True)
class WarmupCosine:
  """lr(step): ``peak*step/warmup`` for step < warmup (0 at step 0), then
  ``min_lr + (peak - min_lr) * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))``.

  ``warmup_steps`` may be fractional (warmup_epochs * steps_per_epoch), as in the official code where
  the lr is set from the fractional epoch ``step / len(loader)``. Steps past ``total_steps`` stay at
  ``min_lr``.

  ``schedule(step)`` uses the fields as constants. ``schedule(step, hparams)`` reads them from
  ``hparams`` (:meth:`hparams`, possibly traced): the training step takes them as an argument, so
  its compiled program does not depend on the lr, the warmup or the run length, and runs that differ
  only in those (an lr sweep, a longer run, the tests) share one compilation.
  """
  peak_lr: float
  warmup_steps: float
  total_steps: int
  min_lr: float = 0.0

  def hparams(self) -> dict[str, np.ndarray]:
    """The schedule's numbers as float32 scalars (the division guards applied)."""
    warmup = float(self.warmup_steps)
    return {"peak_lr": np.float32(self.peak_lr), "warmup": np.float32(warmup),
            "warmup_div": np.float32(max(warmup, 1e-12)),
            "decay": np.float32(max(float(self.total_steps) - warmup, 1.0)),
            "min_lr": np.float32(self.min_lr),
            "half_span": np.float32((self.peak_lr - self.min_lr) * 0.5)}

  def __call__(self, step, hparams: Mapping[str, Any] | None = None) -> jax.Array:
    h = self.hparams() if hparams is None else hparams
    step = jnp.asarray(step, jnp.float32)
    warm = h["peak_lr"] * step / h["warmup_div"]
    progress = jnp.clip((step - h["warmup"]) / h["decay"], 0.0, 1.0)
    cosine = h["min_lr"] + h["half_span"] * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(step < h["warmup"], warm, cosine)


def warmup_cosine_schedule(*, peak_lr: float, warmup_steps: float, total_steps: int,
                           min_lr: float = 0.0) -> WarmupCosine:
  """The :class:`WarmupCosine` schedule (linear warmup, then half-cosine to ``min_lr``)."""
  return WarmupCosine(peak_lr=float(peak_lr), warmup_steps=float(warmup_steps),
                      total_steps=int(total_steps), min_lr=float(min_lr))


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


# ===================================== Fine-tuning: layer-wise lr decay ============================

# Names excluded from weight decay by the classifier's ``no_weight_decay()`` (official).
_NO_WEIGHT_DECAY = ("pos_embed", "cls_token")
# Everything before the transformer stage shares layer 0 (the official ``get_layer_id_for_vit``).
_LAYER0_PREFIXES = ("patch_embed", "blocks1", "blocks2")


def _key_name(entry: Any) -> Any:
  """A path entry as a plain str/int: jax key entries (DictKey, GetAttrKey, ...) or raw names."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def _path_names(path: tuple) -> tuple:
  """``('blocks3', 0, 'attn', 'qkv', 'kernel')`` from a jax key path or a tuple of names.

  The trailing ``value`` that flattening an ``nnx.Variable`` adds is dropped.
  """
  names = tuple(_key_name(e) for e in path)
  if names and names[-1] == "value":
    names = names[:-1]
  return names


def layer_id(path: tuple, num_layers: int) -> int:
  """Layer index of a ConvViT parameter for layer-wise lr decay (official ``util/lr_decay.py``).

  ``path``: the parameter's key path, jax key entries or plain names, e.g. ``('blocks3', 3,
  'mlp', 'fc1', 'kernel')``. ``num_layers``: ``len(blocks3) + 1``.
  Returns 0 for ``pos_embed``, ``cls_token``, every ``patch_embed*`` (including ``patch_embed4``,
  the linear after stage 2) and all of stages 1–2; ``i + 1`` for ``blocks3[i]``; ``num_layers``
  for the rest (``fc_norm``/``norm``, ``head``).
  """
  names = _path_names(path)
  if not names:
    raise ValueError("layer_id: empty parameter path")
  top = str(names[0])
  if top in _NO_WEIGHT_DECAY or top.startswith(_LAYER0_PREFIXES):
    return 0
  if top == "blocks3":
    if len(names) < 2:
      raise ValueError(f"layer_id: path {names!r} has no block index after 'blocks3'")
    return int(names[1]) + 1
  return num_layers


def _num_layers(params: Any) -> int:
  """``len(blocks3) + 1``, counted from the distinct block indices present in the tree."""
  blocks = {int(names[1]) for names in
            (_path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
            if len(names) > 1 and names[0] == "blocks3"}
  return (max(blocks) + 1 if blocks else 0) + 1


def layer_lr_scales(params: Any, layer_decay: float) -> Any:
  """Per-parameter lr multiplier ``layer_decay ** (num_layers - layer_id)``, same tree as ``params``.

  ``params``: the classifier's ``nnx.Param`` state (or its pure dict; may be abstract). The
  number of layers is read from the tree (``len(blocks3) + 1``). At 0.65 for ConvViT-Base
  (12 layers): stages 1–2, patch embeds and pos_embed 0.65**12 ≈ 0.00569, ``blocks3[i]``
  0.65**(11 - i), ``fc_norm`` and ``head`` 1.0.
  """
  num_layers = _num_layers(params)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: float(layer_decay) ** (num_layers - layer_id(path, num_layers)), params)


def finetune_decay_mask(params: Any) -> Any:
  """True for decayed parameters: every one with ndim >= 2 except ``pos_embed``/``cls_token``.

  The official fine-tuning set (``param_groups_lrd``): 1-D parameters (biases, LayerNorm scales)
  and the names in ``no_weight_decay()`` are not decayed; conv kernels and the head kernel are.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and str(_path_names(path)[0]) not in _NO_WEIGHT_DECAY, params)


def make_finetune_optimizer(config, schedule: Callable[[Any], jax.Array],
                            params: Any) -> optax.GradientTransformation:
  """AdamW with layer-wise lr decay, as the official fine-tuning param groups.

  PyTorch: one param group per (layer, decay) with ``lr = lr(t) * lr_scale`` and
  ``weight_decay`` 0 or ``config.weight_decay``. Here: ``optax.adamw`` with
  :func:`finetune_decay_mask`, then the whole update (Adam step and decoupled decay term) times
  the parameter's :func:`layer_lr_scales` scale, so ``p -= lr(t) * scale * (adam + wd * p)`` —
  the same update. Config fields: ``b1``, ``b2``, ``weight_decay``, ``layer_decay``,
  optional ``adam_eps`` (1e-8). ``params`` may be abstract (only structure and ndims are used).
  The scaling is stateless, so the state is that of ``optax.adamw`` (``tree_map_params`` works).
  """
  scales = layer_lr_scales(params, config.layer_decay)
  return optax.chain(
      optax.adamw(
          learning_rate=schedule,
          b1=config.b1,
          b2=config.b2,
          eps=config.get("adam_eps", 1e-8),
          weight_decay=config.weight_decay,
          mask=finetune_decay_mask(params),
      ),
      # Scales first: its leaves are floats, so the map follows the params' structure.
      optax.stateless(lambda updates, _: jax.tree.map(lambda s, u: u * s, scales, updates)),
  )


# ===================================== Linear probe: LARS ==========================================

def lars_mask(params: Any) -> Any:
  """True where LARS applies weight decay and the trust ratio: parameters with ndim > 1."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_lars_optimizer(config, schedule: Callable[[Any], jax.Array],
                        params: Any) -> optax.GradientTransformation:
  """LARS as MoCo-v3's ``LARS`` (the official linear probe's optimizer), step for step.

  Per parameter with ndim > 1: ``g <- g + wd * p``, then ``g <- g * (0.001 * ||p|| / ||g||)`` when
  both norms are > 0 (else unchanged); 1-D parameters (biases, norm scales) get neither. Then
  ``mu <- momentum * mu + g`` and ``p <- p - lr(t) * mu``. Config fields: ``weight_decay``,
  optional ``momentum`` (0.9). ``params`` may be abstract (only ndims are used).

  ``optax.lars`` differs in two ways: (1) it applies the learning rate before the momentum trace
  (``mu <- momentum * mu - lr(t) * g``; ``p <- p + mu``), so past gradients keep the lr of their
  own step — the same only while the lr is constant, different under warmup/cosine; (2) its
  ``weight_decay_mask`` and ``trust_ratio_mask`` default to every parameter, biases included.
  """
  mask = lars_mask(params)
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=mask),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=0.001), mask),
      optax.trace(decay=config.get("momentum", 0.9)),
      # After the trace: mu accumulates raw (trust-scaled) gradients, as MoCo-v3's p -= lr * mu.
      optax.scale_by_learning_rate(schedule),
  )


# ===================================== Segmentation (mmseg, spec §5.2) ==============================

_SEG_LAYER0 = ("patch_embed", "blocks1", "blocks2", "pos_embed")


def segmentation_layer_id(path: tuple, num_layers: int) -> int:
  """Layer id of a :class:`~convmae_jax.models.upernet.Segmentor` parameter for the official
  segmentation layer decay (spec §5.2): 0 for the backbone's ``patch_embed*``, ``blocks1``,
  ``blocks2`` and ``pos_embed``; ``i + 1`` for ``backbone.blocks3[i]``; ``num_layers + 1`` (= 12 at
  11 blocks, scale 1) for everything else (the backbone's ``fpn`` branch, both heads)."""
  names = _path_names(path)
  if len(names) >= 2 and str(names[0]) == "backbone":
    sub = str(names[1])
    if sub.startswith(_SEG_LAYER0):
      return 0
    if sub == "blocks3":
      return int(names[2]) + 1
  return num_layers + 1


def segmentation_lr_scales(params: Any, layer_decay: float) -> Any:
  """Per-parameter multiplier ``layer_decay ** (num_layers + 1 − layer_id)`` with num_layers =
  len(blocks3) (mmseg's ``num_layers=11`` with ids 0..12): at 0.75 and 11 blocks, stages 1–2,
  patch embeds and pos_embed 0.75¹² ≈ 0.0317, ``blocks3[i]`` 0.75^(11 − i), heads and ``fpn`` 1."""
  blocks = {int(names[2]) for names in
            (_path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
            if len(names) > 2 and names[0] == "backbone" and names[1] == "blocks3"}
  num_layers = max(blocks) + 1 if blocks else 0
  return jax.tree_util.tree_map_with_path(
      lambda path, _: float(layer_decay) ** (num_layers + 1 - segmentation_layer_id(path, num_layers)),
      params)


def segmentation_decay_mask(params: Any) -> Any:
  """True for decayed parameters: every one with ndim >= 2. The official rule (1-D parameters and
  names ending in ``.bias`` exempt; its ``pos_embed`` exemption compares a bare name against
  ``backbone.pos_embed`` and never fires) leaves pos_embed and the relative-position tables decayed."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_segmentation_optimizer(config, schedule: Callable[[Any], jax.Array],
                                params: Any) -> optax.GradientTransformation:
  """AdamW(b1, b2) with :func:`segmentation_decay_mask` and the update times
  :func:`segmentation_lr_scales` (``config.layer_decay``), as mmseg's layer-decay param groups:
  ``p -= lr(t) · scale · (adam + wd · p)``."""
  scales = segmentation_lr_scales(params, config.layer_decay)
  return optax.chain(
      optax.adamw(learning_rate=schedule, b1=config.b1, b2=config.b2,
                  eps=config.get("adam_eps", 1e-8), weight_decay=config.weight_decay,
                  mask=segmentation_decay_mask(params)),
      optax.stateless(lambda updates, _: jax.tree.map(lambda s, u: u * s, scales, updates)),
  )


@dataclasses.dataclass(frozen=True)
class WarmupPoly:
  """mmcv's ``PolyLrUpdaterHook`` with linear warmup, per step t:
  ``poly(t) = (peak − min_lr)·(1 − t / total)^power + min_lr`` and, for t < warmup,
  ``poly(t) · (1 − (1 − t / warmup)·(1 − warmup_ratio))`` (mmcv scales the regular lr, so warmup
  starts at ``warmup_ratio · peak``). ``schedule(step, hparams)`` as :class:`WarmupCosine`."""
  peak_lr: float
  warmup_steps: float
  total_steps: int
  min_lr: float = 0.0
  power: float = 1.0
  warmup_ratio: float = 1e-6

  def hparams(self) -> dict[str, np.ndarray]:
    return {"peak_lr": np.float32(self.peak_lr), "warmup": np.float32(self.warmup_steps),
            "warmup_div": np.float32(max(float(self.warmup_steps), 1e-12)),
            "total": np.float32(max(self.total_steps, 1)), "min_lr": np.float32(self.min_lr),
            "power": np.float32(self.power), "warmup_ratio": np.float32(self.warmup_ratio)}

  def __call__(self, step, hparams: Mapping[str, Any] | None = None) -> jax.Array:
    h = self.hparams() if hparams is None else hparams
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip(step / h["total"], 0.0, 1.0)
    poly = (h["peak_lr"] - h["min_lr"]) * (1.0 - progress) ** h["power"] + h["min_lr"]
    # 1 − (1 − t/W)(1 − r) written as r + (1 − r)·t/W: the same number without float32's
    # cancellation (at t = 0 it is r exactly, not 1 − 0.999999).
    factor = h["warmup_ratio"] + (1.0 - h["warmup_ratio"]) * step / h["warmup_div"]
    return jnp.where(step < h["warmup"], poly * factor, poly)
