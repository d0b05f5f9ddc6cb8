"""Visible-only computation of the conv stages (an exact re-formulation of the masked dense maps).

Every op of stages 1–2 except the depthwise conv works per position or on stride-aligned cells that
never straddle a token's pixels, and the depthwise conv only ever reads zeros at masked positions.
So the stages can run on the visible tokens' cells alone: a token of P×P pixels is an f×f cell of
the stage map (f = 4 for stage 1, 2 for stage 2 with the official strides), and the depthwise conv
reads each cell's (f+4)² halo from a zero-filled map holding only the visible cells. This gives the
same numbers as the dense path (tested) with about a quarter of the work at mask ratio 0.75.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from convmae_jax.models import masking


def image_cells(images: jax.Array, ids_keep: jax.Array, patch: int) -> jax.Array:
  """(N, S, S, C) images → the pixels of the kept tokens, (N, K, patch, patch, C)."""
  n, h, w, c = images.shape
  g = h // patch
  x = images.reshape(n, g, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(n, g * (w // patch), patch * patch * c)
  return masking.gather_tokens(x, ids_keep).reshape(n, -1, patch, patch, c)


def cells_to_map(cells: jax.Array, ids_restore: jax.Array, grid: int) -> jax.Array:
  """Scatter visible cells (N, K, f, f, C) into a zero map (N, grid·f, grid·f, C)."""
  n, k, f, _, c = cells.shape
  length = grid * grid
  flat = cells.reshape(n, k, f * f * c)
  full = jnp.concatenate([flat, jnp.zeros((n, length - k, f * f * c), flat.dtype)], axis=1)
  full = masking.gather_tokens(full, ids_restore)
  full = full.reshape(n, grid, grid, f, f, c).transpose(0, 1, 3, 2, 4, 5)
  return full.reshape(n, grid * f, grid * f, c)


def halo_windows(cells: jax.Array, ids_keep: jax.Array, ids_restore: jax.Array, grid: int,
                 pad: int) -> jax.Array:
  """Each visible cell with `pad` pixels of zero-filled context: (N, K, f+2·pad, f+2·pad, C)."""
  n, k, f, _, _ = cells.shape
  padded = jnp.pad(cells_to_map(cells, ids_restore, grid), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jnp.arange(f + 2 * pad)
  rows = (ids_keep // grid)[:, :, None] * f + offsets          # (N, K, W) in padded coordinates
  cols = (ids_keep % grid)[:, :, None] * f + offsets
  batch = jnp.arange(n)[:, None, None, None]
  return padded[batch, rows[:, :, :, None], cols[:, :, None, :]]


def map_cells(fn, cells: jax.Array) -> jax.Array:
  """Applies a map-level op (N', h, w, C) → (N', h', w', C') to each cell of (N, K, f, f, C)."""
  n, k = cells.shape[:2]
  out = fn(cells.reshape((n * k,) + cells.shape[2:]))
  return out.reshape((n, k) + out.shape[1:])
