"""resize_pos_embed equals PyTorch's bicubic F.interpolate (MAE/ConvMAE `interpolate_pos_embed`)."""

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from convmae_jax import models  # noqa: E402
from convmae_jax.models import pos_embed  # noqa: E402

# (old grid, new grid): up, up, down, down, up, square -> rectangular, rectangular -> rectangular.
CASES = [(14, 16), (14, 20), (14, 7), (6, 4), (4, 6), ((14, 14), (20, 32)), ((6, 10), (9, 4))]


def _hw(g):
  return (g, g) if isinstance(g, int) else g


def _torch_resize(x, old, new):
  """The reference: (L, D) numpy -> (L', D) numpy, as MAE's interpolate_pos_embed does it."""
  (gh, gw), (nh, nw) = _hw(old), _hw(new)
  t = torch.from_numpy(x).reshape(1, gh, gw, x.shape[-1]).permute(0, 3, 1, 2)
  y = torch.nn.functional.interpolate(t, size=(nh, nw), mode="bicubic", align_corners=False)
  return y.permute(0, 2, 3, 1).reshape(nh * nw, x.shape[-1]).numpy()


def _embed(old, dim, seed):
  gh, gw = _hw(old)
  return np.random.default_rng(seed).standard_normal((gh * gw, dim))


@pytest.mark.parametrize("dim", [8, 768])
@pytest.mark.parametrize("old,new", CASES)
def test_equals_torch_bicubic_float32(old, new, dim):
  """float32 in/out: within 1e-6 of torch on the same float32 values.

  The reference is torch run in float64 on the float32 input: torch's own float32 kernel is off
  from its float64 result by up to ~4.4e-6 on these N(0, 1) inputs (float32 source coordinates and
  weights), while ours is off by float32 rounding only (~2.4e-7). Against torch's float32 output
  we therefore check 1e-5, and that we are never further from the exact result than it is.
  """
  x = _embed(old, dim, seed=dim).astype(np.float32)
  exact = _torch_resize(x.astype(np.float64), old, new)
  torch32 = _torch_resize(x, old, new)
  got = models.resize_pos_embed(x[None], new, old_grid=None if isinstance(old, int) else old)
  nh, nw = _hw(new)
  assert got.dtype == np.float32 and got.shape == (1, nh * nw, dim)
  np.testing.assert_allclose(got[0], exact, rtol=0, atol=1e-6)
  np.testing.assert_allclose(got[0], torch32, rtol=0, atol=1e-5)
  assert np.abs(got[0] - exact).max() <= np.abs(torch32 - exact).max()
  got2 = models.resize_pos_embed(x, new, old_grid=old)  # rank 2 in, rank 2 out
  assert got2.shape == (nh * nw, dim)
  np.testing.assert_array_equal(got2, got[0])


@pytest.mark.parametrize("dim", [8, 768])
@pytest.mark.parametrize("old,new", CASES)
def test_equals_torch_bicubic_float64(old, new, dim):
  """The float64 computation itself (the two separable matrices) matches torch in float64."""
  x = _embed(old, dim, seed=dim + 1)
  ref = _torch_resize(x, old, new)
  (gh, gw), (nh, nw) = _hw(old), _hw(new)
  rows = pos_embed.bicubic_resize_matrix(gh, nh)
  cols = pos_embed.bicubic_resize_matrix(gw, nw)
  got = np.einsum("ih,hwd,jw->ijd", rows, x.reshape(gh, gw, dim), cols).reshape(nh * nw, dim)
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
  # And the public function is that result rounded to float32.
  np.testing.assert_array_equal(models.resize_pos_embed(x, new, old_grid=old),
                                got.astype(np.float32))


def test_sincos_embedding_resize():
  """The realistic use: a fixed 2-D sin-cos table of a 224 model (14x14) loaded at 320 (20x20)."""
  x = pos_embed.sincos_2d(64, 14)
  ref = _torch_resize(x[0].astype(np.float64), 14, 20)
  np.testing.assert_allclose(pos_embed.resize_pos_embed(x, 20)[0], ref, rtol=0, atol=1e-6)


def test_matrix_rows_sum_to_one_and_downsampling_is_not_antialiased():
  for n_in, n_out in [(14, 7), (4, 6), (1, 3), (3, 1)]:
    m = pos_embed.bicubic_resize_matrix(n_in, n_out)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=0, atol=1e-15)
  # 14 -> 7 samples s = 2j + 0.5: 4 taps per row only (torch uses no antialias filter).
  assert (pos_embed.bicubic_resize_matrix(14, 7)[1:-1] != 0).sum(axis=1).max() == 4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_identity_is_bit_exact(dtype):
  x = _embed(14, 16, seed=3).astype(dtype)
  x[0, 0] = -0.0
  got = pos_embed.resize_pos_embed(x[None], 14)
  assert got.dtype == np.float32 and got.shape == (1, 196, 16)
  np.testing.assert_array_equal(got[0], x.astype(np.float32))
  assert np.signbit(got[0, 0, 0])
  np.testing.assert_array_equal(pos_embed.resize_pos_embed(x, (7, 28), old_grid=(7, 28)),
                                x.astype(np.float32))


def test_invalid_inputs():
  with pytest.raises(ValueError, match="L=195"):
    pos_embed.resize_pos_embed(np.zeros((1, 195, 8)), 16)
  with pytest.raises(ValueError, match="L=196"):
    pos_embed.resize_pos_embed(np.zeros((196, 8)), 16, old_grid=(14, 15))
  with pytest.raises(ValueError, match="shape"):
    pos_embed.resize_pos_embed(np.zeros((2, 196, 8)), 16)
  with pytest.raises(ValueError, match="new_grid"):
    pos_embed.resize_pos_embed(np.zeros((196, 8)), (16, 0))
  # Rectangular grids need old_grid; (1, L, D) with a non-square L but an explicit grid is fine.
  assert pos_embed.resize_pos_embed(np.zeros((1, 6 * 10, 8)), 5, old_grid=(6, 10)).shape == (
      1, 25, 8)


def test_no_torch_in_training_code():
  assert "import torch" not in inspect.getsource(pos_embed)
