"""Checkpoint layout round trips (convmae_jax/checkpoints.py), on a small hand-made NNX module."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convmae_jax import checkpoints


class Frozen(nnx.Variable):
  """Stands in for models.FrozenPosEmbed: a non-Param variable that must still be saved."""


class Block(nnx.Module):

  def __init__(self, dim, *, rngs):
    self.fc = nnx.Linear(dim, dim, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, rngs=rngs)


class Tiny(nnx.Module):

  def __init__(self, dim=4, depth=3, *, rngs):
    self.blocks = nnx.List([Block(dim, rngs=rngs) for _ in range(depth)])
    self.mask_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, dim)))
    self.pos_embed = Frozen(jnp.arange(2 * dim, dtype=jnp.float32).reshape(1, 2, dim))
    self.rngs = rngs


def _leaves(model):
  return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.RngState))))


def test_save_and_load_model_round_trip_keeps_int_keys(tmp_path):
  src = Tiny(rngs=nnx.Rngs(0))
  meta = {"model_name": "tiny", "model_kwargs": {"dim": 4, "depth": 3}}
  path = checkpoints.save_model(tmp_path, src, meta)
  assert path == tmp_path / "checkpoints" / "0"
  assert checkpoints.latest_step(tmp_path) == 0

  pure, got_meta = checkpoints.load_model_state(tmp_path)
  assert got_meta == {**meta, "step": 0}
  assert sorted(pure["blocks"].keys()) == [0, 1, 2]            # nnx.List indices come back as ints
  np.testing.assert_array_equal(pure["pos_embed"], src.pos_embed[...])

  dst = Tiny(rngs=nnx.Rngs(1))
  assert not np.allclose(dst.blocks[2].fc.kernel[...], src.blocks[2].fc.kernel[...])
  # The pure dict fits nnx.replace_by_pure_dict directly (the documented use for interop).
  state = nnx.state(dst)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(dst, state)
  for a, b in zip(_leaves(src), _leaves(dst)):
    np.testing.assert_array_equal(a, b)


def test_load_into_from_workdir_or_checkpoints_dir_and_latest_step(tmp_path):
  src = Tiny(rngs=nnx.Rngs(0))
  checkpoints.save_model(tmp_path, Tiny(rngs=nnx.Rngs(5)), {"model_name": "old"}, step=3)
  checkpoints.save_model(tmp_path / "checkpoints", src, {"model_name": "new"}, step=7)
  assert checkpoints.latest_step(tmp_path) == 7
  assert checkpoints.latest_step(tmp_path / "checkpoints") == 7

  for directory in (tmp_path, tmp_path / "checkpoints", str(tmp_path)):
    dst = Tiny(rngs=nnx.Rngs(2))
    meta = checkpoints.load_into(directory, dst)
    assert meta["model_name"] == "new" and meta["step"] == 7
    for a, b in zip(_leaves(src), _leaves(dst)):
      np.testing.assert_array_equal(a, b)

  dst = Tiny(rngs=nnx.Rngs(2))
  assert checkpoints.load_into(tmp_path, dst, step=3)["model_name"] == "old"
  np.testing.assert_array_equal(dst.mask_token[...], Tiny(rngs=nnx.Rngs(5)).mask_token[...])
  with open(tmp_path / "checkpoints" / "7" / "meta" / "metadata") as f:
    assert json.load(f)["step"] == 7


def test_overwrite_and_clear_errors(tmp_path):
  model = Tiny(rngs=nnx.Rngs(0))
  with pytest.raises(FileNotFoundError, match="No checkpoint found"):
    checkpoints.load_model_state(tmp_path / "nothing_here")
  with pytest.raises(FileNotFoundError, match="No checkpoint found"):
    checkpoints.load_into(tmp_path, model)
  assert checkpoints.latest_step(tmp_path) is None

  checkpoints.save_model(tmp_path, model, {"model_name": "a"})
  with pytest.raises(FileExistsError, match="overwrite=True"):
    checkpoints.save_model(tmp_path, model, {"model_name": "b"})
  checkpoints.save_model(tmp_path, Tiny(rngs=nnx.Rngs(9)), {"model_name": "b"}, overwrite=True)
  _, meta = checkpoints.load_model_state(tmp_path)
  assert meta["model_name"] == "b"
  with pytest.raises(FileNotFoundError, match=r"step 4 .* \[0\]"):
    checkpoints.load_model_state(tmp_path, step=4)

  # A checkpoint of another architecture is refused with the offending paths and shapes.
  with pytest.raises(ValueError, match=r"blocks/3/fc/kernel"):
    checkpoints.load_into(tmp_path, Tiny(depth=4, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"checkpoint \(4, 4\) vs model \(8, 8\)"):
    checkpoints.load_into(tmp_path, Tiny(dim=8, rngs=nnx.Rngs(0)))


def test_load_into_casts_dtype_and_keeps_model_sharding(tmp_path):
  src = Tiny(rngs=nnx.Rngs(0))
  checkpoints.save_model(tmp_path, src, {"model_name": "tiny"})
  dst = Tiny(rngs=nnx.Rngs(3))
  dst.blocks[0].fc.kernel.set_value(dst.blocks[0].fc.kernel[...].astype(jnp.bfloat16))
  sharding = dst.blocks[0].fc.kernel[...].sharding
  checkpoints.load_into(tmp_path, dst)
  assert dst.blocks[0].fc.kernel[...].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dst.blocks[0].fc.kernel[...], np.float32),
                             np.asarray(src.blocks[0].fc.kernel[...]), rtol=1e-2)
  assert dst.blocks[0].fc.kernel[...].sharding == sharding
  assert os.path.isdir(tmp_path / "checkpoints" / "0" / "model")
