"""Fixed 2-D sin-cos position embeddings with the official ConvMAE/MAE channel layout."""

import numpy as np


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """Embeds scalar positions into `dim` channels: [sin(p*w_k) for k] + [cos(p*w_k) for k].

  w_k = 10000 ** (-k / (dim/2)), k = 0 .. dim/2 - 1. Computed in float64.
  Returns (len(positions), dim).
  """
  if dim % 2:
    raise ValueError(f"sin-cos embedding width must be even, got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.asarray(positions, np.float64).reshape(-1)[:, None] * omega[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int) -> np.ndarray:
  """2-D embedding for a grid_size x grid_size token grid, row-major tokens (t = row*G + col).

  The first dim/2 channels encode the column index, the second dim/2 the row index (the official
  layout). Returns float32 (1, G*G, dim).
  """
  if dim % 4:
    raise ValueError(f"2-D sin-cos embedding width must be a multiple of 4, got {dim}")
  rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float32),
                           np.arange(grid_size, dtype=np.float32), indexing="ij")
  emb = np.concatenate([sincos_1d(dim // 2, cols.reshape(-1)),
                        sincos_1d(dim // 2, rows.reshape(-1))], axis=1)
  return emb.astype(np.float32)[None]
