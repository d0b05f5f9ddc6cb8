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


# ------------------------------------------------------------------------- resizing (fine-tuning)

_CUBIC_A = -0.75  # PyTorch's (and OpenCV's) Keys-kernel coefficient; PIL uses -0.5


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Keys cubic-convolution weights of the 4 taps at offsets -1, 0, 1, 2 for fractions t in [0, 1).

  Same formulas as PyTorch's `cubic_convolution1/2` (A = -0.75). t: (n,) -> (n, 4), rows sum to 1.
  """
  a = _CUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):   # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)


def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float64 matrix M with M @ x == PyTorch's 1-D bicubic resize of x.

  PyTorch, align_corners=False, no antialias, scale from the sizes: output pixel j samples the
  source coordinate s = (j + 0.5) * in/out - 0.5 (not clamped, also for downsampling), taps
  floor(s) - 1 .. floor(s) + 2 with the Keys weights of t = s - floor(s), tap indices clamped to
  [0, in_size - 1] (so weights of out-of-range taps add up on the border pixel).
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be >= 1, got in_size={in_size}, out_size={out_size}")
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
  base = np.floor(src)
  weights = _cubic_weights(src - base)
  taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
  m = np.zeros((out_size, in_size), np.float64)
  # add.at accumulates repeated (clamped) tap indices instead of overwriting them.
  np.add.at(m, (np.repeat(np.arange(out_size), 4), taps.reshape(-1)), weights.reshape(-1))
  return m


def _grid_hw(grid, name: str) -> tuple[int, int]:
  if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
    hw = (int(grid), int(grid))
  elif (isinstance(grid, (tuple, list)) and len(grid) == 2
        and all(isinstance(g, (int, np.integer)) and not isinstance(g, bool) for g in grid)):
    hw = (int(grid[0]), int(grid[1]))
  else:
    raise ValueError(f"{name}={grid!r} is not valid: expected an int or a (rows, cols) pair "
                     "of ints")
  if min(hw) < 1:
    raise ValueError(f"{name}={grid!r} is not valid: grid sizes must be >= 1")
  return hw


def resize_pos_embed(pos_embed, new_grid: int | tuple[int, int],
                     old_grid: int | tuple[int, int] | None = None) -> np.ndarray:
  """Resizes a patch-grid position embedding exactly like PyTorch's bicubic interpolate.

  Equals ``F.interpolate(x.reshape(1, gh, gw, D).permute(0, 3, 1, 2), size=(new_h, new_w),
  mode="bicubic", align_corners=False)`` permuted and flattened back, i.e. what MAE's/ConvMAE's
  `interpolate_pos_embed` and the detection backbones do when loading a checkpoint at another
  resolution (see `bicubic_resize_matrix` for the exact sampling). Computed in float64 as two
  separable matrix products.

  pos_embed: (1, L, D) or (L, D) float, no cls token, tokens row-major over the (gh, gw) grid
    (t = row * gw + col, the NHWC flatten order).
  new_grid: new (rows, cols), or an int for a square grid.
  old_grid: (gh, gw) of pos_embed; None means square, gh = gw = sqrt(L).
  Returns float32 with the input's rank: (1, new_h * new_w, D) or (new_h * new_w, D). Equal sizes
  return the input unchanged (cast to float32).
  """
  x = np.asarray(pos_embed)
  if x.ndim == 3 and x.shape[0] == 1:
    tokens = x[0]
  elif x.ndim == 2:
    tokens = x
  else:
    raise ValueError(f"pos_embed must have shape (1, L, D) or (L, D), got {x.shape}")
  length, dim = tokens.shape
  if old_grid is None:
    side = int(round(np.sqrt(length)))
    if side * side != length:
      raise ValueError(f"pos_embed has L={length} tokens, which is not a square grid; pass "
                       "old_grid=(rows, cols) (a cls token must be removed first)")
    gh, gw = side, side
  else:
    gh, gw = _grid_hw(old_grid, "old_grid")
    if gh * gw != length:
      raise ValueError(f"old_grid={old_grid!r} has {gh * gw} cells but pos_embed has L={length}")
  nh, nw = _grid_hw(new_grid, "new_grid")
  if (nh, nw) == (gh, gw):
    # Bit-exact by construction (the matrix path would turn -0.0 into 0.0 and inf into nan).
    return x.astype(np.float32, copy=True)
  grid = tokens.astype(np.float64).reshape(gh, gw, dim)
  rows, cols = bicubic_resize_matrix(gh, nh), bicubic_resize_matrix(gw, nw)
  out = np.einsum("ih,hwd,jw->ijd", rows, grid, cols, optimize=True).reshape(nh * nw, dim)
  out = out.astype(np.float32)
  return out[None] if x.ndim == 3 else out
