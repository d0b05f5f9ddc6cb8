"""Per-sample random masking on the token grid and its upsampling to the conv-stage grids."""

import jax
import jax.numpy as jnp


def num_visible(num_tokens: int, mask_ratio: float) -> int:
  """Visible tokens per sample: int(L * (1 - mask_ratio)) with Python truncation, as official."""
  return int(num_tokens * (1 - mask_ratio))


def random_masking(noise: jax.Array, len_keep: int):
  """MAE-style masking from per-sample noise.

  Args:
    noise: (N, L) values; tokens with the smallest noise are kept.
    len_keep: number of visible tokens per sample.
  Returns:
    ids_keep (N, len_keep) int32 in ascending-noise order (not re-sorted, as official),
    mask (N, L) float32 with 0 = visible, 1 = removed,
    ids_restore (N, L) int32 with ids_restore[ids_shuffle] = arange(L).
  """
  n, length = noise.shape
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  ids_keep = ids_shuffle[:, :len_keep]
  mask_shuffled = jnp.concatenate(
      [jnp.zeros((n, len_keep), jnp.float32), jnp.ones((n, length - len_keep), jnp.float32)], axis=1)
  mask = jnp.take_along_axis(mask_shuffled, ids_restore, axis=1)
  return ids_keep, mask, ids_restore


def upsample_mask(mask: jax.Array, grid_size: int, factor: int) -> jax.Array:
  """Nearest-neighbour upsampling of a (N, G*G) token mask to (N, G*factor, G*factor)."""
  n = mask.shape[0]
  m = mask.reshape(n, grid_size, 1, grid_size, 1)
  m = jnp.broadcast_to(m, (n, grid_size, factor, grid_size, factor))
  return m.reshape(n, grid_size * factor, grid_size * factor)


def gather_tokens(x: jax.Array, ids: jax.Array) -> jax.Array:
  """x (N, L, D), ids (N, K) -> (N, K, D)."""
  return jnp.take_along_axis(x, ids[:, :, None], axis=1)


def complementary_noise(noise: jax.Array, num_groups: int) -> jax.Array:
  """FastConvMAE's complementary masks as masking noise.

  The tokens of each row, in ascending-noise order, are split into `num_groups` consecutive groups
  of L/num_groups; group g keeps tokens ids_shuffle[g·V:(g+1)·V]. Returns (N·num_groups, L) noise,
  row n·num_groups + g for group g of sample n, whose `random_masking` keeps exactly that group
  (in the same order) and masks the rest: the ranks rolled by g·V.
  """
  n, length = noise.shape
  group = length // num_groups
  rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1).astype(jnp.float32)      # (N, L)
  shift = (jnp.arange(num_groups, dtype=jnp.float32) * group)[None, :, None]
  rolled = jnp.mod(rank[:, None, :] - shift, float(length))                      # (N, G, L)
  return rolled.reshape(n * num_groups, length)
