"""The jaxpr FLOP counter used by the benchmarks: closed forms on single ops, and ConvMAE-B's forward
against the official model's count (spec §6.4, torch.utils.flop_counter)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from convmae_jax import flops, models


def sds(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_matmul_and_batched_matmul():
  assert flops.count(jnp.matmul, sds(3, 5), sds(5, 7)) == 2 * 3 * 5 * 7
  assert flops.count(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), sds(4, 3, 5), sds(4, 5, 7)) == \
      2 * 4 * 3 * 5 * 7


def conv(x, w, groups=1):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=groups)


def test_dense_and_depthwise_conv():
  assert flops.count(conv, sds(2, 8, 8, 3), sds(3, 3, 3, 4)) == 2 * (2 * 8 * 8 * 4) * (3 * 3 * 3)
  # Depthwise: each output element is one 5x5 filter on one channel.
  assert flops.count(lambda x, w: conv(x, w, 6), sds(1, 8, 8, 6), sds(5, 5, 1, 6)) == \
      2 * (8 * 8 * 6) * 25


def test_gradients_count_forward_and_backward_products():
  fwd = 2 * 3 * 5 * 7
  # d/da and d/db of sum(a @ b) are one product each.
  assert flops.count(jax.grad(lambda a, b: jnp.sum(a @ b), argnums=(0, 1)), sds(3, 5), sds(5, 7)) == \
      3 * fwd
  # Only the gradient that is asked for is computed.
  assert flops.count(jax.grad(lambda a, b: jnp.sum(a @ b)), sds(3, 5), sds(5, 7)) == 2 * fwd
  cf = 2 * (2 * 8 * 8 * 4) * 27
  assert flops.count(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)),
                     sds(2, 8, 8, 3), sds(3, 3, 3, 4)) == 3 * cf


def test_sub_programs_scan_jit_remat_and_cond():
  fwd = 2 * 4 * 4 * 4

  def body(c, _):
    return c @ c, None

  assert flops.count(lambda a: jax.lax.scan(body, a, None, length=5)[0], sds(4, 4)) == 5 * fwd
  assert flops.count(jax.jit(lambda a: jax.checkpoint(lambda b: b @ b)(a)), sds(4, 4)) == fwd
  # cond: the costlier branch.
  f = lambda p, a: jax.lax.cond(p, lambda b: (b @ b) @ b, lambda b: b, a)  # noqa: E731
  assert flops.count(f, jax.ShapeDtypeStruct((), jnp.bool_), sds(4, 4)) == 2 * fwd


def test_convmae_base_forward_matches_the_official_count():
  # Spec §6.4: the official pretraining forward at mask ratio 0.75 (encoder + decoder), 224 px.
  model = nnx.eval_shape(lambda: models.create("convmae_base", rngs=nnx.Rngs(0), conv_impl="dense",
                                               dwconv_impl="lax"))
  graphdef, state = nnx.split(model)

  def fwd(state, images, noise):
    return nnx.merge(graphdef, state)(images, noise=noise)[0]

  n = flops.count(fwd, state, sds(1, 224, 224, 3), sds(1, 196))
  assert n / 1e9 == pytest.approx(34.44, rel=0.01)
  # The visible-only stages skip the masked cells of stages 1-2 and so do less.
  model_v = nnx.eval_shape(lambda: models.create("convmae_base", rngs=nnx.Rngs(0), conv_impl="visible",
                                                 dwconv_impl="lax"))
  graphdef_v, state_v = nnx.split(model_v)
  n_v = flops.count(lambda s, i, z: nnx.merge(graphdef_v, s)(i, noise=z)[0], state_v,
                    sds(1, 224, 224, 3), sds(1, 196))
  assert 0.5 * n < n_v < 0.8 * n
