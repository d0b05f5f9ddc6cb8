"""ConvViT: the ConvMAE encoder as an image classifier (fine-tuning, linear probing) and a
multi-scale feature extractor (stride 4, 8 and 16 maps for dense prediction).

Differs from the pretraining encoder as the official one does: no mask, no stage-1/2 decode
features, a trainable position embedding, drop path over all blocks, and a pooled head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convmae_jax.models import layers, transformer
from convmae_jax.models.config import ConvViTConfig


def _normal_002(fan_in: int, fan_out: int):
  del fan_in, fan_out
  return layers.normal(0.02)  # timm's trunc_normal(0.02) truncates at ±2 absolute: a plain normal


def conv_stages(model, images: jax.Array, remat: bool = False):
  """Stages 1–2 and the stage-3 patch embedding of a ConvViT-layout module (`patch_embed1..3`,
  `blocks1`, `blocks2`; the classifier and the backbones): (stride-4 map, stride-8 map,
  stride-16 map (N, g, g, D) before `patch_embed4`). `remat`: recompute each conv block in the
  backward pass (at 1024 px the stride-4 stage holds most of the activations)."""
  run = (lambda blk, x: blk(x))
  if remat:
    run = nnx.remat(run)
  x = model.patch_embed1(images.astype(model.config.jnp_dtype))
  for blk in model.blocks1:
    x = run(blk, x)
  f4 = x
  x = model.patch_embed2(x)
  for blk in model.blocks2:
    x = run(blk, x)
  return f4, x, model.patch_embed3(x)


def drop_path_rates(depths, rate: float) -> list[float]:
  """linspace(0, rate, sum(depths)) over all blocks in order (stage 1, 2, then 3)."""
  return [float(r) for r in np.linspace(0.0, rate, int(sum(depths)))]


class HeadBatchNorm(nnx.Module):
  """BatchNorm1d(affine=False, eps 1e-6, momentum 0.1) before the linear-probe head, as PyTorch
  computes it: batch statistics (biased variance) in training, running statistics in eval; the
  running variance is updated with the unbiased batch variance. ``model.eval()`` switches it."""

  def __init__(self, dim: int, *, eps: float = 1e-6, momentum: float = 0.1,
               use_running_average: bool = False):
    self.eps = eps
    self.momentum = momentum
    self.use_running_average = use_running_average
    self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((dim,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      n = x.shape[0]
      mean = jnp.mean(x, axis=0)
      var = jnp.mean(jnp.square(x - mean), axis=0)
      m = self.momentum
      self.mean[...] = (1 - m) * self.mean[...] + m * mean
      self.var[...] = (1 - m) * self.var[...] + m * var * (n / max(n - 1, 1))
    return (x - mean) * jax.lax.rsqrt(var + self.eps)


class ConvViT(nnx.Module):
  """Classifier. `logits = model(images)`; `model.features(images)` for the stage maps.

  Drop path is active until `model.eval()`; its randomness comes from the `dropout` stream.
  """

  def __init__(self, config: ConvViTConfig, *, rngs: nnx.Rngs):
    config.validate()
    self.config = config
    dt = config.jnp_dtype
    impl = config.dwconv_impl
    (p1, p2, p3), (c1, c2, d) = config.patch_sizes, config.embed_dims
    r1, r2, r3 = config.mlp_ratios
    n1, n2, _ = config.depths
    dpr = drop_path_rates(config.depths, config.drop_path_rate)

    self.patch_embed1 = layers.PatchEmbed(config.in_chans, c1, p1, dtype=dt, rngs=rngs)
    self.blocks1 = nnx.List([layers.CBlock(c1, r1, drop_path=dpr[i], dwconv_impl=impl, dtype=dt,
                                           rngs=rngs) for i in range(n1)])
    self.patch_embed2 = layers.PatchEmbed(c1, c2, p2, dtype=dt, rngs=rngs)
    self.blocks2 = nnx.List([layers.CBlock(c2, r2, drop_path=dpr[n1 + i], dwconv_impl=impl,
                                           dtype=dt, rngs=rngs) for i in range(n2)])
    self.patch_embed3 = layers.PatchEmbed(c2, d, p3, dtype=dt, rngs=rngs)
    self.patch_embed4 = layers.Linear(d, d, kernel_init=layers.normal(0.02), dtype=dt, rngs=rngs)
    self.pos_embed = nnx.Param(layers.normal(0.02)(rngs.params(), (1, config.num_patches, d)))
    self.blocks3 = nnx.List([
        transformer.Block(d, config.num_heads, r3, kernel_init=_normal_002, drop_path=dpr[n1 + n2 + i],
                     attention_impl=config.attention_impl, dtype=dt, rngs=rngs)
        for i in range(config.depths[2])])
    if config.global_pool:
      self.fc_norm = layers.LayerNorm(d, 1e-6, dtype=dt)
    else:
      self.norm = layers.LayerNorm(d, 1e-6, dtype=dt)
    if config.head_batchnorm:
      self.head_bn = HeadBatchNorm(d)
    self.head = layers.Linear(d, config.num_classes, kernel_init=layers.normal(0.02), dtype=dt,
                              rngs=rngs)

  def _check_inputs(self, images: jax.Array) -> None:
    cfg = self.config
    expected = (cfg.img_size, cfg.img_size, cfg.in_chans)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"images must be (N, {cfg.img_size}, {cfg.img_size}, {cfg.in_chans}) NHWC "
                       f"for this model (img_size={cfg.img_size}), got {tuple(images.shape)}")

  def features(self, images: jax.Array) -> dict[str, jax.Array]:
    """Stage outputs: {"stride4": (N,g1,g1,C1), "stride8": (N,g2,g2,C2), "stride16": (N,g3,g3,D)}.

    The stride-16 map is the transformer output before any norm (as the detection and
    segmentation backbones use it).
    """
    self._check_inputs(images)
    f4, f8, x = conv_stages(self, images)
    n, g, _, d = x.shape
    x = self.patch_embed4(x.reshape(n, g * g, d)) + self.pos_embed[...].astype(x.dtype)
    for blk in self.blocks3:
      x = blk(x)
    return {"stride4": f4, "stride8": f8, "stride16": x.reshape(n, g, g, d)}

  def pooled(self, images: jax.Array) -> jax.Array:
    """The (N, D) representation that feeds the head."""
    x = self.features(images)["stride16"]
    n, g, _, d = x.shape
    x = x.reshape(n, g * g, d)
    if self.config.global_pool:
      return self.fc_norm(jnp.mean(x.astype(jnp.float32), axis=1))
    return self.norm(x)[:, 0]

  def __call__(self, images: jax.Array) -> jax.Array:
    """images (N, S, S, C) normalized NHWC → logits (N, num_classes) float32."""
    x = self.pooled(images)
    if self.config.head_batchnorm:
      x = self.head_bn(x)
    return self.head(x).astype(jnp.float32)
