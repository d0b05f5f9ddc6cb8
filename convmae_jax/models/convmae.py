"""The ConvMAE pretraining model: hybrid conv+transformer encoder, multi-scale fusion, decoder, loss.

Data flow (NHWC, grids g1 = S/4, g2 = S/8, g3 = S/16 for the official strides, L = g3²):
  images (N,S,S,3) → patch_embed1 → 2 CBlocks with the stage-1 visible mask → (N,g1,g1,C1)
  → patch_embed2 → CBlocks with the stage-2 visible mask → (N,g2,g2,C2)
  → patch_embed3 → tokens (N,L,D) → patch_embed4 (Linear) → + pos_embed → keep visible tokens
  → transformer blocks → + stage-1/2 decode features at the visible tokens → norm → latent
  → decoder (mask tokens, unshuffle, pos embed, blocks, norm, pred) → (N, L, P²·3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from convmae_jax.models import layers, transformer
from convmae_jax.models import masking
from convmae_jax.models import visible
from convmae_jax.models.config import ConvMAEConfig
from convmae_jax.models.convvit import conv_stages as unmasked_conv_stages
from convmae_jax.models.pos_embed import sincos_2d


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(N, H, W, C) → (N, (H/p)·(W/p), p·p·C); token row-major, features in (p, q, c) order."""
  n, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {p}")
  x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, patch_size: int, channels: int = 3) -> jax.Array:
  """Inverse of `patchify` for square images: (N, L, p·p·C) → (N, √L·p, √L·p, C)."""
  n, length, dim = x.shape
  g = int(round(length ** 0.5))
  p = patch_size
  if g * g != length or dim != p * p * channels:
    raise ValueError(f"cannot unpatchify {x.shape} with patch_size {p} and {channels} channels")
  x = x.reshape(n, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, g * p, g * p, channels)


def masked_patch_loss(images: jax.Array, pred: jax.Array, mask: jax.Array, patch_size: int,
                      norm_pix_loss: bool) -> jax.Array:
  """Mean squared error over removed patches of the batch, in float32.

  With norm_pix_loss the target patch is (t − mean) / √(var + 1e-6), var unbiased (÷(P²C − 1)).
  """
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


def _xavier(fan_in: int, fan_out: int):
  return layers.xavier_uniform(fan_in, fan_out)


class ConvMAE(nnx.Module):
  """ConvMAE pretraining model. Attribute names mirror the official state-dict keys.

  Call: `loss, pred, mask = model(images, noise=noise)`; `encode` gives the latents only;
  `encode_unmasked` runs the encoder on whole images (no mask) for judging the representation.
  """

  def __init__(self, config: ConvMAEConfig, *, rngs: nnx.Rngs):
    config.validate()
    self.config = config
    dt = config.jnp_dtype
    impl = config.dwconv_impl
    (p1, p2, p3), (c1, c2, d) = config.patch_sizes, config.embed_dims
    r1, r2, r3 = config.mlp_ratios
    g3 = config.grid_sizes[2]
    dd = config.decoder_embed_dim

    self.patch_embed1 = layers.PatchEmbed(config.in_chans, c1, p1, dtype=dt, rngs=rngs)
    self.blocks1 = nnx.List([layers.CBlock(c1, r1, dwconv_impl=impl, dtype=dt, rngs=rngs)
                             for _ in range(config.depths[0])])
    self.patch_embed2 = layers.PatchEmbed(c1, c2, p2, dtype=dt, rngs=rngs)
    self.blocks2 = nnx.List([layers.CBlock(c2, r2, dwconv_impl=impl, dtype=dt, rngs=rngs)
                             for _ in range(config.depths[1])])
    # patch_embed3's weight is xavier-initialised on its 2-D view (out, in·p·p).
    self.patch_embed3 = layers.PatchEmbed(c2, d, p3, kernel_init=_xavier(c2 * p3 * p3, d),
                                          dtype=dt, rngs=rngs)
    self.patch_embed4 = layers.Linear(d, d, kernel_init=_xavier(d, d), dtype=dt, rngs=rngs)
    # Multi-scale fusion: stride-(p2·p3) and stride-p3 convs bring stages 1 and 2 to the token grid.
    s1, s2 = p2 * p3, p3
    self.stage1_output_decode = layers.PatchConv(
        c1, d, s1, kernel_init=layers.torch_default(c1 * s1 * s1),
        bias_init=layers.torch_default(c1 * s1 * s1), dtype=dt, rngs=rngs)
    self.stage2_output_decode = layers.PatchConv(
        c2, d, s2, kernel_init=layers.torch_default(c2 * s2 * s2),
        bias_init=layers.torch_default(c2 * s2 * s2), dtype=dt, rngs=rngs)
    self.pos_embed = layers.FrozenPosEmbed(jnp.asarray(sincos_2d(d, g3)))
    attn = config.attention_impl
    self.blocks3 = nnx.List([transformer.Block(d, config.num_heads, r3, kernel_init=_xavier,
                                          attention_impl=attn, dtype=dt, rngs=rngs)
                             for _ in range(config.depths[2])])
    self.norm = layers.LayerNorm(d, 1e-6, dtype=dt)

    dec_ratio = config.decoder_mlp_ratio if config.decoder_mlp_ratio is not None else r1
    self.decoder_embed = layers.Linear(d, dd, kernel_init=_xavier(d, dd), dtype=dt, rngs=rngs)
    self.mask_token = nnx.Param(layers.normal(0.02)(rngs.params(), (1, 1, dd)))
    self.decoder_pos_embed = layers.FrozenPosEmbed(jnp.asarray(sincos_2d(dd, g3)))
    self.decoder_blocks = nnx.List([
        transformer.Block(dd, config.decoder_num_heads, dec_ratio, kernel_init=_xavier,
                     attention_impl=attn, dtype=dt, rngs=rngs)
        for _ in range(config.decoder_depth)])
    self.decoder_norm = layers.LayerNorm(dd, 1e-6, dtype=dt)
    out = config.total_stride ** 2 * config.in_chans
    self.decoder_pred = layers.Linear(dd, out, kernel_init=_xavier(dd, out), dtype=dt, rngs=rngs)
    # Masking noise when none is given: the `masking` stream (falls back to `default`).
    self.masking_rngs = rngs["masking"].fork()

  # --------------------------------------------------------------------------------------------
  @property
  def patch_size(self) -> int:
    """Pixels per token side (product of the stage strides)."""
    return self.config.total_stride

  @property
  def grid_size(self) -> int:
    return self.config.grid_sizes[2]

  @property
  def num_patches(self) -> int:
    return self.config.num_patches

  @property
  def num_groups(self) -> int:
    """Complementary mask groups per image: rows of pred/mask per image (1 without them)."""
    return self.config.num_groups

  @property
  def len_keep(self) -> int:
    return masking.num_visible(self.num_patches, self.config.mask_ratio)

  def _check_images(self, images: jax.Array) -> None:
    cfg = self.config
    expected = (cfg.img_size, cfg.img_size, cfg.in_chans)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"images must be (N, {cfg.img_size}, {cfg.img_size}, {cfg.in_chans}) NHWC "
                       f"for this model (img_size={cfg.img_size}), got {tuple(images.shape)}")

  def _check_inputs(self, images: jax.Array, noise: jax.Array | None) -> jax.Array:
    self._check_images(images)
    n = images.shape[0]
    if noise is None:
      return jax.random.uniform(self.masking_rngs(), (n, self.num_patches), jnp.float32)
    if tuple(noise.shape) != (n, self.num_patches):
      raise ValueError(f"noise must be (N, L) = {(n, self.num_patches)}, got {tuple(noise.shape)}")
    return noise

  def _dense_stages(self, images, ids_keep, mask):
    """Stages 1–2 on the full maps, masked by multiplication (the official formulation)."""
    g1, g2, g3 = self.config.grid_sizes
    visible1 = (1.0 - masking.upsample_mask(mask, g3, g1 // g3))[..., None]
    visible2 = (1.0 - masking.upsample_mask(mask, g3, g2 // g3))[..., None]
    x = self.patch_embed1(images.astype(self.config.jnp_dtype))
    for blk in self.blocks1:
      x = blk(x, visible1)
    n = x.shape[0]
    s1 = self.stage1_output_decode(x).reshape(n, g3 * g3, -1)
    x = self.patch_embed2(x)
    for blk in self.blocks2:
      x = blk(x, visible2)
    s2 = self.stage2_output_decode(x).reshape(n, g3 * g3, -1)
    x = self.patch_embed3(x).reshape(n, g3 * g3, -1)
    gather = lambda t: masking.gather_tokens(t, ids_keep)
    return gather(x), gather(s1), gather(s2)

  def _dense_stages_groups(self, images, ids_keep, mask):
    """Stages 1–2 once on the full maps for complementary groups (FastConvMAE's formulation):
    every position is masked by its own group, then each group's tokens are gathered.

    ids_keep (N·G, V) and mask (N·G, L) are the groups' rows, sample-major.
    """
    g1, g2, g3 = self.config.grid_sizes
    n, groups = images.shape[0], self.config.num_groups
    member = 1.0 - mask                                                    # (N·G, L), 1 = in group

    def group_maps(factor):
      m = masking.upsample_mask(member, g3, factor).reshape(n, groups, g3 * factor, g3 * factor)
      return jnp.moveaxis(m, 1, -1)                                        # (N, H, W, G)

    groups1, groups2 = group_maps(g1 // g3), group_maps(g2 // g3)
    x = self.patch_embed1(images.astype(self.config.jnp_dtype))
    for blk in self.blocks1:
      x = blk(x, groups=groups1)
    s1 = self.stage1_output_decode(x).reshape(n, g3 * g3, -1)
    x = self.patch_embed2(x)
    for blk in self.blocks2:
      x = blk(x, groups=groups2)
    s2 = self.stage2_output_decode(x).reshape(n, g3 * g3, -1)
    x = self.patch_embed3(x).reshape(n, g3 * g3, -1)
    gather = lambda t: masking.gather_tokens(jnp.repeat(t, groups, axis=0), ids_keep)
    return gather(x), gather(s1), gather(s2)

  def _visible_stages(self, images, ids_keep, ids_restore):
    """Stages 1–2 on the visible tokens' cells only (exactly equal to `_dense_stages`).

    With complementary groups, ids_keep has N·G rows (sample-major) for N images: each group's
    cells are taken from its own image, so every position is computed once, in its own group.
    """
    g3 = self.config.grid_sizes[2]
    n, groups = images.shape[0], self.config.num_groups
    x = visible.image_cells(images.astype(self.config.jnp_dtype),
                            ids_keep.reshape(n, -1), self.patch_size)
    x = x.reshape((n * groups, -1) + x.shape[2:])
    x = visible.map_cells(self.patch_embed1, x)
    halo = lambda y: visible.halo_windows(y, ids_keep, ids_restore, g3, pad=2)
    for blk in self.blocks1:
      x = blk(x, halo=halo)
    n, k = x.shape[:2]
    s1 = visible.map_cells(self.stage1_output_decode, x).reshape(n, k, -1)
    x = visible.map_cells(self.patch_embed2, x)
    for blk in self.blocks2:
      x = blk(x, halo=halo)
    s2 = visible.map_cells(self.stage2_output_decode, x).reshape(n, k, -1)
    x = visible.map_cells(self.patch_embed3, x).reshape(n, k, -1)
    return x, s1, s2

  def conv_stages(self, images: jax.Array, ids_keep: jax.Array, ids_restore: jax.Array,
                  mask: jax.Array):
    """Stages 1–2 and patch_embed3 for the kept tokens, by `config.conv_impl`.

    Returns (tokens after patch_embed3, stage-1 decode, stage-2 decode), each (N, K, D) in
    ids_keep order (N·G rows with G complementary groups; see `encode`).
    """
    if self.config.conv_impl == "dense":
      if self.config.num_groups > 1:
        return self._dense_stages_groups(images, ids_keep, mask)
      return self._dense_stages(images, ids_keep, mask)
    return self._visible_stages(images, ids_keep, ids_restore)

  def encode(self, images: jax.Array, noise: jax.Array | None = None):
    """Encoder on visible tokens only.

    Args:
      images: (N, S, S, C) normalized images, NHWC.
      noise: (N, L) in [0, 1); the smallest len_keep values per row are kept. None: drawn from the
        model's `masking` rng stream.
    Returns:
      latent (N, len_keep, D) in ids_keep order, mask (N, L) (1 = removed), ids_restore (N, L).
      With `complementary_masks` (G groups) each comes with N·G rows, row n·G + g being group g of
      image n: its visible tokens are the g-th block of len_keep tokens in ascending-noise order.
    """
    noise = self._check_inputs(images, noise)
    if self.config.num_groups > 1:
      noise = masking.complementary_noise(noise, self.config.num_groups)
    ids_keep, mask, ids_restore = masking.random_masking(noise, self.len_keep)
    x, s1, s2 = self.conv_stages(images, ids_keep, ids_restore, mask)
    # patch_embed4 and the position embedding act per token, so they run on the kept ones only.
    pos = masking.gather_tokens(
        jnp.broadcast_to(self.pos_embed[...], (x.shape[0],) + self.pos_embed.shape[1:]), ids_keep)
    x = self.patch_embed4(x) + pos.astype(x.dtype)
    for blk in self.blocks3:
      x = blk(x)
    x = x + s1 + s2
    return self.norm(x), mask, ids_restore

  def encode_unmasked(self, images: jax.Array) -> jax.Array:
    """The encoder on whole images, no mask: stages 1–3 as the ConvViT classifier runs them (the
    weights fine-tuning and linear probing start from), e.g. for a k-NN monitor of pretraining.

    Args:
      images: (N, S, S, C) normalized images, NHWC.
    Returns:
      the stage-3 tokens (N, L, D) in row-major grid order, in the compute dtype: the output of
      the last transformer block, before the stage-1/2 fusion and `norm`, which only feed the
      decoder. Draws no randomness and leaves `__call__` and `encode` unchanged.
    """
    self._check_images(images)
    _, _, x = unmasked_conv_stages(self, images)
    n, g, _, d = x.shape
    x = self.patch_embed4(x.reshape(n, g * g, d)) + self.pos_embed[...].astype(x.dtype)
    for blk in self.blocks3:
      x = blk(x)
    return x

  def decode(self, latent: jax.Array, ids_restore: jax.Array) -> jax.Array:
    """latent (N, K, D) in ids_keep order → per-patch predictions (N, L, P²·C)."""
    x = self.decoder_embed(latent)
    n, k, dd = x.shape
    tokens = jnp.broadcast_to(self.mask_token[...].astype(x.dtype), (n, self.num_patches - k, dd))
    x = masking.gather_tokens(jnp.concatenate([x, tokens], axis=1), ids_restore)
    x = x + self.decoder_pos_embed[...].astype(x.dtype)
    for blk in self.decoder_blocks:
      x = blk(x)
    return self.decoder_pred(self.decoder_norm(x))

  def loss(self, images: jax.Array, pred: jax.Array, mask: jax.Array) -> jax.Array:
    return masked_patch_loss(images, pred, mask, self.patch_size, self.config.norm_pix_loss)

  def __call__(self, images: jax.Array, noise: jax.Array | None = None):
    """Returns (loss scalar float32, pred (N, L, P²·C), mask (N, L) with 1 = removed).

    With `complementary_masks` (G groups), pred and mask have N·G rows (row n·G + g: group g of
    image n) and the loss is the mean of the groups' losses (they mask equally many tokens).
    """
    latent, mask, ids_restore = self.encode(images, noise)
    pred = self.decode(latent, ids_restore)
    groups = self.config.num_groups
    targets = images if groups == 1 else jnp.repeat(images, groups, axis=0)
    return self.loss(targets, pred, mask), pred, mask
