"""ConvViT as a detection / segmentation backbone (spec §5.1–§5.3): the fine-tuning encoder with
local window attention in stage 3, relative position terms, and a feature pyramid.

    from flax import nnx
    from convmae_jax import models
    net = models.create("convvit_det_base", rngs=nnx.Rngs(0))          # detectron2 layout, 1024 px
    maps = net.features(images)  # {"stride4": (N,256,256,256), ..., "stride32": (N,32,32,768)}

The layers are the encoder's (`layers.CBlock`, `layers.PatchEmbed`, `transformer.Block` with its
window / relative-position / layer-scale options); attribute names mirror the official backbones'
state-dict keys, so `interop.backbone` is a renaming.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convmae_jax.models import layers, transformer
from convmae_jax.models.config import BackboneConfig
from convmae_jax.models.convvit import _normal_002, conv_stages, drop_path_rates
from convmae_jax.models.pos_embed import bicubic_resize_matrix, sincos_2d


def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
  """(L, L) int64 table row of every (query, key) pair of a (gh, gw) grid, L = gh·gw, as the official
  BEiT-style modules keep it in their `relative_position_index` buffer."""
  gh, gw = grid
  coords = np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :]                  # (2, L, L): dy, dx
  return ((rel[0] + gh - 1) * (2 * gw - 1) + (rel[1] + gw - 1)).astype(np.int64)


class RelPosBias(nnx.Module):
  """A relative-position-bias table shared by several blocks (§5.1), zero-initialised.

  `relative_position_bias_table` ((2gh−1)(2gw−1), heads); calling it gives (heads, L, L)."""

  def __init__(self, grid: tuple[int, int], num_heads: int):
    self.grid = tuple(int(g) for g in grid)
    gh, gw = self.grid
    self.relative_position_bias_table = nnx.Param(
        jnp.zeros(((2 * gh - 1) * (2 * gw - 1), num_heads), jnp.float32))

  def __call__(self) -> jax.Array:
    return transformer.table_bias(self.relative_position_bias_table[...], self.grid)


class Conv3x3Stride2(nnx.Module):
  """3×3 conv, stride 2, no padding (the segmentation backbone's `fpn.0`), kernel HWIO."""

  def __init__(self, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    init = layers.torch_default(dim * 9)
    self.kernel = nnx.Param(init(rngs.params(), (3, 3, dim, dim)))
    self.bias = nnx.Param(init(rngs.params(), (dim,)))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                     (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...].astype(self.dtype)


class BatchNorm(nnx.Module):
  """BatchNorm2d over the channels of NHWC maps (eps 1e-5, momentum 0.1, affine), as PyTorch: batch
  statistics while training (running variance updated with the unbiased one), running statistics
  after `model.eval()`. Variable names are the PyTorch buffer names."""

  def __init__(self, dim: int, *, eps: float = 1e-5, momentum: float = 0.1,
               use_running_average: bool = False):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.running_mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32))
    self.running_var = nnx.BatchStat(jnp.ones((dim,), jnp.float32))
    self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
    self.eps = eps
    self.momentum = momentum
    self.use_running_average = use_running_average

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = self.running_mean[...], self.running_var[...]
    else:
      axes = tuple(range(x.ndim - 1))
      n = int(np.prod([x.shape[a] for a in axes]))
      mean = jnp.mean(x, axis=axes)
      var = jnp.mean(jnp.square(x - mean), axis=axes)
      m = self.momentum
      self.running_mean[...] = (1 - m) * self.running_mean[...] + m * mean
      self.running_var[...] = (1 - m) * self.running_var[...] + m * var * (n / max(n - 1, 1))
      self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
    y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(dtype)


class ConvViTBackbone(nnx.Module):
  """The backbone. `maps = model.features(images)`; `model(images)` is the same.

  images (N, S, S, C) NHWC normalized, S = config.img_size. Drop path is active until
  `model.eval()`, which also switches the BatchNorm of `out_stride32="conv_bn_gelu"` to its running
  statistics.
  """

  def __init__(self, config: BackboneConfig, *, rngs: nnx.Rngs):
    config.validate()
    self.config = config
    dt = config.jnp_dtype
    impl = config.dwconv_impl
    (p1, p2, p3), (c1, c2, d) = config.patch_sizes, config.embed_dims
    r1, r2, r3 = config.mlp_ratios
    n1, n2, n3 = config.depths
    heads = config.num_heads
    dpr = drop_path_rates(config.depths, config.drop_path_rate)
    grid = config.grid_sizes[2]
    ws = config.window_size

    self.patch_embed1 = layers.PatchEmbed(config.in_chans, c1, p1, dtype=dt, rngs=rngs)
    self.blocks1 = nnx.List([
        layers.CBlock(c1, r1, drop_path=dpr[i], dwconv_impl=impl, norm_eps=config.cblock_norm_eps,
                      dtype=dt, rngs=rngs) for i in range(n1)])
    self.patch_embed2 = layers.PatchEmbed(c1, c2, p2, dtype=dt, rngs=rngs)
    self.blocks2 = nnx.List([
        layers.CBlock(c2, r2, drop_path=dpr[n1 + i], dwconv_impl=impl,
                      norm_eps=config.cblock_norm_eps, dtype=dt, rngs=rngs) for i in range(n2)])
    self.patch_embed3 = layers.PatchEmbed(c2, d, p3, dtype=dt, rngs=rngs)
    self.patch_embed4 = layers.Linear(d, d, kernel_init=layers.normal(0.02), dtype=dt, rngs=rngs)

    # Starts as the sin-cos table of its grid; loading a pretrained checkpoint replaces it.
    pos_grid = config.pretrain_grid if config.pos_embed == "interpolate" else grid
    pos = jnp.asarray(sincos_2d(d, pos_grid))
    self.pos_embed = (layers.FrozenPosEmbed(pos) if config.pos_embed == "frozen"
                      else nnx.Param(pos))

    per_block = {"per_block_table": "table", "decomposed": "decomposed"}.get(config.rel_pos, "none")
    blocks = []
    for i in range(n3):
      is_global = config.is_global(i)
      attn_grid = (grid, grid) if is_global else (ws, ws)
      blocks.append(transformer.Block(
          d, heads, r3, kernel_init=_normal_002, drop_path=dpr[n1 + n2 + i],
          window_size=0 if is_global else ws, layer_scale=config.layer_scale, rel_pos=per_block,
          rel_pos_grid=attn_grid if per_block != "none" else None, lean_softmax=True,
          attention_impl=config.attention_impl, dtype=dt, rngs=rngs))
    self.blocks3 = nnx.List(blocks)
    if config.rel_pos == "shared_table":
      if len(config.global_blocks) < n3:
        self.windowed_rel_pos_bias = RelPosBias((ws, ws), heads)
      if config.global_blocks:
        self.global_rel_pos_bias = RelPosBias((grid, grid), heads)
    if config.out_stride32 == "conv_bn_gelu":
      self.fpn = nnx.List([Conv3x3Stride2(d, dtype=dt, rngs=rngs), BatchNorm(d)])

  # ---------------------------------------------------------------------------------------------

  def global_block_indices(self) -> tuple[int, ...]:
    """Stage-3 blocks that attend over the whole grid (read from the blocks themselves)."""
    return tuple(i for i, blk in enumerate(self.blocks3) if blk.window_size == 0)

  def _check_inputs(self, images: jax.Array) -> None:
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != cfg.in_chans:
      raise ValueError(f"images must be (N, H, W, {cfg.in_chans}) NHWC, got {tuple(images.shape)}")
    if tuple(images.shape[1:3]) != (cfg.img_size, cfg.img_size):
      raise ValueError(
          f"this backbone was built for {cfg.img_size}x{cfg.img_size} images (img_size), got "
          f"{images.shape[1]}x{images.shape[2]}; pad or resize the images, or build the model with "
          f"img_size={images.shape[1]} if that size is accepted")

  def _pos_embed(self, grid: int, dtype) -> jax.Array:
    pos = self.pos_embed[...]
    if self.config.pos_embed == "interpolate":
      old = self.config.pretrain_grid
      if old != grid:
        m = jnp.asarray(bicubic_resize_matrix(old, grid), jnp.float32)
        pos = pos.reshape(old, old, -1)
        pos = jnp.einsum("ih,hwd,jw->ijd", m, pos, m).reshape(1, grid * grid, -1)
    return pos.astype(dtype)

  def features(self, images: jax.Array) -> dict[str, jax.Array]:
    """Feature pyramid, NHWC in the compute dtype: {"stride4": (N, S/4, S/4, C1), "stride8":
    (N, S/8, S/8, C2), "stride16": (N, S/16, S/16, D) (the last stage-3 block, no norm), and unless
    out_stride32="none", "stride32": (N, S/32, S/32, D) (maxpool) or (N, (S/16−3)//2+1, ..., D)
    (conv_bn_gelu)}."""
    self._check_inputs(images)
    cfg = self.config
    f4, f8, x = conv_stages(self, images, remat=cfg.remat)
    n, g, _, d = x.shape
    x = self.patch_embed4(x.reshape(n, g * g, d)) + self._pos_embed(g, x.dtype)
    shared = {}
    if hasattr(self, "windowed_rel_pos_bias"):
      shared[False] = self.windowed_rel_pos_bias()
    if hasattr(self, "global_rel_pos_bias"):
      shared[True] = self.global_rel_pos_bias()

    def run(block, x, bias):
      return block(x, grid=(g, g), bias=bias)

    if cfg.remat:
      run = nnx.remat(run)
    for blk in self.blocks3:
      x = run(blk, x, shared.get(blk.window_size == 0))
    f16 = x.reshape(n, g, g, d)
    out = {"stride4": f4, "stride8": f8, "stride16": f16}
    if cfg.out_stride32 == "maxpool":
      out["stride32"] = jax.lax.reduce_window(f16, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                              (1, 2, 2, 1), "VALID")
    elif cfg.out_stride32 == "conv_bn_gelu":
      out["stride32"] = layers.gelu(self.fpn[1](self.fpn[0](f16)))
    return out

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    return self.features(images)
