"""The backward passes written out in `layers`, against XLA's own derivatives and float64:

* `layer_norm`: the forward pass is the two-pass float32 formula bit for bit; the backward pass
  gives XLA's derivative of that formula up to float reordering, for every input dtype, inside
  `jax.checkpoint` and inside a whole model's gradient.
* `matmul`: on XLA:CPU the kernel gradient is a plain product of a transposed copy (no product with
  both operands transposed is left in the compiled program); values as XLA's derivative.
* bfloat16 products on XLA:CPU (`matmul`, `batched_matmul`): no operand is widened to float32 in
  the compiled program (so YNNPACK's bfloat16 kernels run them); values as XLA's.
* a kernel gradient computed as dyᵀ·x (fan_in ≥ fan_out) is transposed into one stored copy, not
  folded into its consumers (which would each read it transposed).
* the depthwise conv's kernel gradient on XLA:CPU: each batched product is a YNNPACK fusion that
  also reduces its rows (`dwconv.rows_parallel`, the identity bit for bit), the form YNNPACK runs
  on every core.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convmae_jax import models
from convmae_jax.models import layers


def _plain(x, scale, bias, eps):
  """The formula as it was written before the backward pass was: XLA differentiates it."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  centered = x - mean
  var = jnp.mean(centered * centered, axis=-1, keepdims=True)
  return centered * jax.lax.rsqrt(var + eps) * scale + bias


def _float64_grads(x, scale, dy, eps):
  """(dx, dscale, dbias) in float64 numpy, from the definition (chain rule through mean and var)."""
  x, scale, dy = (np.asarray(a, np.float64) for a in (x, scale, dy))
  n = x.shape[-1]
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  rs = 1.0 / np.sqrt(var + eps)
  x_hat = (x - mean) * rs
  g = dy * scale
  dvar = np.sum(g * (x - mean), -1, keepdims=True) * -0.5 * rs ** 3
  dmean = -np.sum(g * rs, -1, keepdims=True) + dvar * np.mean(-2.0 * (x - mean), -1, keepdims=True)
  dx = g * rs + dvar * 2.0 * (x - mean) / n + dmean / n
  rows = tuple(range(x.ndim - 1))
  return dx, np.sum(dy * x_hat, rows), np.sum(dy, rows)


def _inputs(shape, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  c = shape[-1]
  x = 3.0 * jax.random.normal(k[0], shape) + 1.5          # a mean and a spread to take out
  scale = 1.0 + 0.3 * jax.random.normal(k[1], (c,))
  bias = 0.2 * jax.random.normal(k[2], (c,))
  dy = jax.random.normal(k[3], shape)
  return x, scale, bias, dy


def _vjp(fn, x, scale, bias, dy, eps):
  y, pull = jax.vjp(lambda a, s, b: fn(a, s, b, eps), x, scale, bias)
  return (y,) + pull(dy.astype(y.dtype))


@pytest.mark.parametrize("shape,eps", [((2, 5, 7, 16), 1e-5), ((3, 11, 24), 1e-6), ((4, 256), 1e-5)])
def test_forward_bit_equal_and_gradients_match_autodiff_and_float64(shape, eps):
  x, scale, bias, dy = _inputs(shape)
  ours = jax.jit(lambda *a: _vjp(layers.layer_norm, *a, eps))(x, scale, bias, dy)
  plain = jax.jit(lambda *a: _vjp(_plain, *a, eps))(x, scale, bias, dy)
  np.testing.assert_array_equal(np.asarray(ours[0]), np.asarray(plain[0]))
  exact = _float64_grads(x, scale, dy, eps)
  for mine, xla, ref in zip(ours[1:], plain[1:], exact):
    assert mine.shape == xla.shape == ref.shape and mine.dtype == jnp.float32
    size = float(np.max(np.abs(ref)))
    err_ours = float(np.max(np.abs(np.asarray(mine, np.float64) - ref))) / size
    err_xla = float(np.max(np.abs(np.asarray(xla, np.float64) - ref))) / size
    assert err_ours < 2e-6, (err_ours, err_xla)
    assert float(np.max(np.abs(np.asarray(mine) - np.asarray(xla)))) / size < 4e-6


def test_bfloat16_input_gets_a_bfloat16_gradient_and_float32_parameter_gradients():
  x, scale, bias, dy = _inputs((2, 6, 32), seed=1)
  xb = x.astype(jnp.bfloat16)
  ours = _vjp(layers.layer_norm, xb, scale, bias, dy, 1e-5)
  plain = _vjp(_plain, xb, scale, bias, dy, 1e-5)
  assert ours[1].dtype == jnp.bfloat16 and plain[1].dtype == jnp.bfloat16
  assert ours[2].dtype == ours[3].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(ours[0]), np.asarray(plain[0]))
  for a, b in zip(ours[1:], plain[1:]):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert float(np.max(np.abs(a - b))) <= 0.02 * float(np.max(np.abs(b)))


def test_module_output_dtype_and_checkpoint_policy():
  x, _, _, dy = _inputs((2, 4, 4, 16), seed=2)
  norm = layers.LayerNorm(16, 1e-5, dtype=jnp.bfloat16)
  assert norm(x).dtype == jnp.bfloat16
  norm = layers.LayerNorm(16, 1e-5)
  graphdef, params = nnx.split(norm, nnx.Param)
  loss = lambda p, a: jnp.sum(nnx.merge(graphdef, p)(a) * dy)
  remat = jax.checkpoint(loss, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  g1 = jax.grad(loss, argnums=(0, 1))(params, x)
  g2 = jax.grad(remat, argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_whole_model_gradient_matches_the_plain_formulas(monkeypatch):
  """A tiny ConvViT's parameter gradients with the written backward passes against XLA's
  derivatives of the plain formulas (the layers patched back to them): equal up to float
  reordering."""
  model = models.create("convvit_tiny", rngs=nnx.Rngs(0), img_size=32, num_classes=5,
                        global_pool=True, drop_path_rate=0.0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  images = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))

  def grads():
    loss = lambda p: jnp.sum(jax.nn.log_softmax(nnx.merge(graphdef, p, rest)(images))[:, 1])
    return jax.jit(jax.grad(loss))(params)

  ours = grads()
  monkeypatch.setattr(layers, "layer_norm", _plain)
  monkeypatch.setattr(layers, "matmul", lambda x, kernel: x @ kernel)
  plain = grads()
  leaves_ours, leaves_plain = jax.tree.leaves(ours), jax.tree.leaves(plain)
  assert len(leaves_ours) == len(leaves_plain) > 20
  worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / (float(np.max(np.abs(b))) + 1e-12)
              for a, b in zip(leaves_ours, leaves_plain))
  assert worst < 2e-5, worst     # measured 6.5e-7


def _dense_inputs(lead, fan_in, fan_out, seed=0, dtype=jnp.float32):
  k = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k[0], lead + (fan_in,)).astype(dtype)
  kernel = (jax.random.normal(k[1], (fan_in, fan_out)) / np.sqrt(fan_in)).astype(dtype)
  dy = jax.random.normal(k[2], lead + (fan_out,)).astype(dtype)
  return x, kernel, dy


def _product_vjp(fn, x, kernel, dy):
  y, pull = jax.vjp(fn, x, kernel)
  return (y,) + pull(dy)


@pytest.mark.parametrize("lead,fan_in,fan_out", [((2, 3, 5), 8, 24), ((4, 7), 24, 8), ((30,), 16, 16)])
def test_matmul_gradients_match_xla_and_float64(lead, fan_in, fan_out):
  x, kernel, dy = _dense_inputs(lead, fan_in, fan_out)
  ours = jax.jit(lambda *a: _product_vjp(layers.matmul, *a))(x, kernel, dy)
  plain = jax.jit(lambda *a: _product_vjp(lambda u, w: u @ w, *a))(x, kernel, dy)
  np.testing.assert_array_equal(np.asarray(ours[0]), np.asarray(plain[0]))
  x64, k64, dy64 = (np.asarray(a, np.float64) for a in (x, kernel, dy))
  exact = (dy64 @ k64.T, x64.reshape(-1, fan_in).T @ dy64.reshape(-1, fan_out))
  for mine, xla, ref in zip(ours[1:], plain[1:], exact):
    assert mine.shape == xla.shape == ref.shape and mine.dtype == jnp.float32
    size = float(np.max(np.abs(ref)))
    assert float(np.max(np.abs(np.asarray(mine, np.float64) - ref))) / size < 1e-6
    assert float(np.max(np.abs(np.asarray(mine) - np.asarray(xla)))) / size < 1e-6


_BOTH_TRANSPOSED = re.compile(r"dot\([^)]*\), lhs_contracting_dims=\{0\}, rhs_contracting_dims=\{0\}")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the written product is XLA:CPU's")
@pytest.mark.parametrize("fan_in,fan_out", [(16, 48), (48, 16)])
def test_matmul_kernel_gradient_is_a_plain_product_on_cpu(fan_in, fan_out):
  x, kernel, dy = _dense_inputs((64,), fan_in, fan_out)

  def hlo(fn):
    grad = jax.jit(lambda a, w: jax.vjp(fn, a, w)[1](dy))
    return grad.lower(x, kernel).compile().as_text()

  # XLA's derivative contracts the rows of both operands; the written one never does.
  assert _BOTH_TRANSPOSED.search(hlo(lambda u, w: u @ w))
  assert not _BOTH_TRANSPOSED.search(hlo(layers.matmul))


def _transposed_tap_fusions(text: str) -> int:
  """Fusions of a compiled program that transpose and also hold the depthwise conv's 25 taps."""
  bodies = re.findall(r"\n%fused_computation[^\n]*\{\n(.*?)\n\}", text, flags=re.S)
  return sum(1 for body in bodies if " transpose(" in body and body.count(" slice(") >= 25)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the written product is XLA:CPU's")
def test_square_kernel_gradient_does_not_recompute_the_depthwise_conv_transposed(monkeypatch):
  # A conv block's conv2 (square) reads the depthwise conv: had its kernel gradient transposed x,
  # XLA would recompute the conv's 25 taps inside that transposing copy.
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (2, 16, 16, 32))
  taps = 0.2 * jax.random.normal(k[1], (5, 5, 1, 32))
  w = jax.random.normal(k[2], (32, 32)) / 6
  dy = jax.random.normal(k[3], x.shape)

  def grads(product):
    def f(x, taps, w):
      return jnp.sum(product(models.dwconv.depthwise_conv_shift(x, taps) + 0.5, w) * dy)
    fn = jax.jit(jax.grad(f, argnums=(0, 1, 2)))
    return fn(x, taps, w), fn.lower(x, taps, w).compile().as_text()

  ours, text = grads(layers.matmul)
  # The rule before: a square kernel's transposed copy made of x.
  monkeypatch.setattr(layers, "_kernel_grad_transposes_x", lambda fan_in, fan_out: fan_in <= fan_out)
  before, text_before = grads(layers.matmul)
  assert _transposed_tap_fusions(text) == 0
  assert _transposed_tap_fusions(text_before) == 1
  for a, b in zip(ours, before):
    size = float(jnp.max(jnp.abs(b)))
    assert float(jnp.max(jnp.abs(a - b))) / size < 1e-6


def _computations(text: str) -> dict[str, str]:
  """{name: body} of the computations in a compiled program's HLO text."""
  return dict(re.findall(r"\n%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", text, flags=re.S))


def _transposing_fusions(text: str, shape: str) -> int:
  """Fusions of a compiled program whose result has ``shape`` (e.g. "f32[96,24]") and that hold a
  transpose: where the (fan_out, fan_in) product dyᵀ·x is read as the (fan_in, fan_out) kernel
  gradient."""
  comps = _computations(text)
  count = 0
  for name, body in comps.items():
    if " transpose(" not in body:
      continue
    callers = re.findall(r"\n\s*%[\w.\-]+ = " + re.escape(shape) + r"\{[^\n]*calls=%" +
                         re.escape(name) + r"[,\s]", text)
    count += len(callers)
  return count


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the written product is XLA:CPU's")
def test_kernel_gradient_from_dy_transposed_is_stored_once(monkeypatch):
  # fan_in > fan_out (an MLP's fc2): the product is dyᵀ·x (fan_out, fan_in). Its transpose is
  # copied once; a bare .T would be folded into each consumer (an optimizer's two moment updates
  # and the gradient norm here), each then reading the gradient transposed.
  k = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(k[0], (64, 96))
  w = jax.random.normal(k[1], (96, 24)) / 10
  dy = jax.random.normal(k[2], (64, 24))
  mu, nu = jax.random.normal(k[3], (96, 24)), jnp.abs(jax.random.normal(k[4], (96, 24)))

  def update(x, w, dy, mu, nu):
    dk = jax.vjp(layers.matmul, x, w)[1](dy)[1]
    return 0.9 * mu + 0.1 * dk, 0.999 * nu + 0.001 * dk * dk, jnp.sum(dk * dk)

  def compiled():
    jax.clear_caches()      # the custom VJP's backward is traced once per function otherwise
    fn = jax.jit(update)
    return fn(x, w, dy, mu, nu), fn.lower(x, w, dy, mu, nu).compile().as_text()

  ours, text = compiled()
  monkeypatch.setattr(layers, "_kernel_grad_back", lambda dk_t: dk_t.T)   # the form before
  before, text_before = compiled()
  assert _transposing_fusions(text, "f32[96,24]") == 0
  assert _transposing_fusions(text_before, "f32[96,24]") >= 2
  assert text.count(" copy(") >= 1
  for a, b in zip(ours, before):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  dk = np.asarray(x, np.float64).T @ np.asarray(dy, np.float64)
  np.testing.assert_allclose(np.asarray(ours[0]), 0.9 * np.asarray(mu) + 0.1 * dk, rtol=1e-5,
                             atol=1e-5)


def test_rows_parallel_is_the_identity():
  y = jax.random.normal(jax.random.key(0), (3, 5, 7)) * 1e3
  y = y.at[0, 0, 2].set(-jnp.inf).at[0, 1, 3].set(jnp.inf).at[1, 2].set(-0.0)
  np.testing.assert_array_equal(np.asarray(models.dwconv.rows_parallel(y)), np.asarray(y))
  # A NaN takes its whole row (and only its row) with it.
  out = np.asarray(models.dwconv.rows_parallel(y.at[2, 4, 1].set(jnp.nan)))
  assert np.isnan(out[2, 4]).all() and not np.isnan(np.delete(out.reshape(-1, 7), 14, 0)).any()


def _batched_products(text: str) -> tuple[int, int]:
  """(batched products inside a YNNPACK fusion that also has a reduce, batched products anywhere
  else) in a compiled XLA:CPU program."""
  comps = _computations(text)
  in_ynn = elsewhere = 0
  for name, body in comps.items():
    products = len(re.findall(r" dot\([^\n]*lhs_batch_dims", body))
    if not products:
      continue
    callers = re.findall(r"\n[^\n]*calls=%" + re.escape(name) + r"[,\s][^\n]*", text)
    if body.count(" reduce(") and callers and all("__ynn_fusion" in c for c in callers):
      in_ynn += products
    else:
      elsewhere += products
  return in_ynn, elsewhere


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the form is XLA:CPU's")
def test_depthwise_kernel_gradient_products_reduce_their_rows_in_ynnpack():
  # Rows of 16 output columns and more: at (2, 12, 9, 16) XLA leaves the row reduction outside
  # the YNNPACK fusion.
  x = jax.random.normal(jax.random.key(0), (2, 16, 20, 32))
  taps = jax.random.normal(jax.random.key(1), (5, 5, 1, 32))
  dy = jax.random.normal(jax.random.key(2), x.shape)
  # x and dy are arguments, not constants: XLA would fold the whole gradient at compile time.
  fn = jax.jit(jax.grad(lambda k, x, dy: jnp.sum(models.dwconv.depthwise_conv_shift(x, k) * dy)))
  text = fn.lower(taps, x, dy).compile().as_text()
  assert _batched_products(text) == (5, 0)                  # one per kernel row, none elsewhere
  want = jax.grad(lambda k: jnp.sum(models.dwconv._shift_taps(x, k) * dy))(taps)
  assert float(jnp.max(jnp.abs(fn(taps, x, dy) - want))) <= 1e-5 * float(jnp.max(jnp.abs(want)))


def test_matmul_bfloat16_dtypes_and_module_use():
  x, kernel, dy = _dense_inputs((6, 5), 12, 20, seed=4, dtype=jnp.bfloat16)
  y, dx, dk = _product_vjp(layers.matmul, x, kernel, dy)
  assert y.dtype == dx.dtype == dk.dtype == jnp.bfloat16
  _, dx_plain, dk_plain = _product_vjp(lambda u, w: u @ w, x, kernel, dy)
  for a, b in ((dx, dx_plain), (dk, dk_plain)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert float(np.max(np.abs(a - b))) <= 0.02 * float(np.max(np.abs(b)))
  # Linear goes through it: its kernel gradient is the written product's.
  lin = layers.Linear(12, 20, kernel_init=layers.normal(0.1), rngs=nnx.Rngs(0))
  xf, _, dyf = _dense_inputs((6, 5), 12, 20, seed=5)
  graphdef, params = nnx.split(lin, nnx.Param)
  g_lin = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(xf) * dyf))(params)["kernel"][...]
  g_fn = jax.grad(lambda w: jnp.sum(layers.matmul(xf, w) * dyf))(lin.kernel[...])
  np.testing.assert_array_equal(np.asarray(g_lin), np.asarray(g_fn))


# ----------------------------------------------------------------- bfloat16 products on XLA:CPU

def _f32_converts(fn, *args):
  """Conversions to float32 in fn's compiled program (XLA's widening of bfloat16 operands)."""
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  return [line for line in hlo.splitlines() if " convert(" in line and "= f32[" in line]


def _batched_inputs(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  a = jax.random.normal(k[0], (2, 3, 40, 16)).astype(jnp.bfloat16)
  b = jax.random.normal(k[1], (2, 3, 16, 24)).astype(jnp.bfloat16)
  g = jax.random.normal(k[2], (2, 3, 40, 24)).astype(jnp.bfloat16)
  return a, b, g


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's bfloat16 products")
@pytest.mark.parametrize("fn_name", ["matmul", "batched_matmul"])
def test_bfloat16_products_and_their_gradients_stay_bfloat16_on_cpu(fn_name):
  fn = getattr(layers, fn_name)
  if fn_name == "matmul":
    args = _dense_inputs((64,), 32, 48, seed=6, dtype=jnp.bfloat16)
  else:
    args = _batched_inputs(seed=6)
  grads = lambda f: (lambda a, b, g: _product_vjp(f, a, b, g))
  # XLA widens both operands of every product (and its gradients) to float32 when asked for a
  # bfloat16 result; the written products ask for float32 results of bfloat16 operands instead.
  assert len(_f32_converts(grads(lambda a, b: a @ b), *args)) >= 3
  assert _f32_converts(grads(fn), *args) == []
  ours = jax.jit(grads(fn))(*args)
  plain = jax.jit(grads(lambda a, b: a @ b))(*args)
  a64, b64, g64 = (np.asarray(t, np.float64) for t in args)
  if fn_name == "matmul":
    exact = (a64 @ b64, g64 @ b64.T, a64.T @ g64)
  else:
    exact = (a64 @ b64, g64 @ np.swapaxes(b64, -1, -2), np.swapaxes(a64, -1, -2) @ g64)
  np.testing.assert_array_equal(np.asarray(ours[0], np.float32), np.asarray(plain[0], np.float32))
  for mine, xla, ref in zip(ours, plain, exact):
    assert mine.dtype == xla.dtype == jnp.bfloat16 and mine.shape == ref.shape
    size = float(np.max(np.abs(ref)))
    # Both are float32 sums rounded once to bfloat16 (relative step 2^-8).
    assert float(np.max(np.abs(np.asarray(mine, np.float64) - ref))) / size < 2 ** -8
    assert float(np.max(np.abs(np.asarray(mine, np.float64) - np.asarray(xla, np.float64)))) \
        / size < 2 ** -8


def test_batched_matmul_float32_is_the_plain_product():
  a, b, g = (t.astype(jnp.float32) for t in _batched_inputs(seed=7))
  ours = jax.jit(lambda *t: _product_vjp(layers.batched_matmul, *t))(a, b, g)
  plain = jax.jit(lambda *t: _product_vjp(lambda u, w: u @ w, *t))(a, b, g)
  for mine, ref in zip(ours, plain):
    np.testing.assert_array_equal(np.asarray(mine), np.asarray(ref))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's bfloat16 sums")
def test_bfloat16_bias_gradient_is_a_float32_row_sum_on_cpu():
  k = jax.random.split(jax.random.key(8), 3)
  y = jax.random.normal(k[0], (8, 56, 56, 64)).astype(jnp.bfloat16)
  bias = jax.random.normal(k[1], (64,))
  dy = jax.random.normal(k[2], y.shape).astype(jnp.bfloat16)

  def vjp(fn):
    return jax.jit(lambda y, b, g: _product_vjp(fn, y, b, g))

  plain = lambda y, b: y + b.astype(y.dtype)
  hlo = lambda fn: vjp(fn).lower(y, bias, dy).compile().as_text()
  # Autodiff's multi-axis bfloat16 sum becomes reduce-windows; the written one a row sum.
  assert "reduce-window" in hlo(plain)
  assert "reduce-window" not in hlo(layers.add_bias)
  out, dy_out, db = vjp(layers.add_bias)(y, bias, dy)
  out_plain, _, db_plain = vjp(plain)(y, bias, dy)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(out_plain, np.float32))
  np.testing.assert_array_equal(np.asarray(dy_out, np.float32), np.asarray(dy, np.float32))
  assert db.dtype == db_plain.dtype == jnp.float32 and db.shape == (64,)
  exact = np.asarray(dy, np.float64).reshape(-1, 64).sum(0)
  # Rounded once to bfloat16: within half a bfloat16 step (at most 2^-8 relative) of the exact sum.
  assert np.all(np.abs(np.asarray(db, np.float64) - exact) <= np.abs(exact) * 2 ** -8 + 1e-6)
  # Autodiff's reduce-windows add in bfloat16: further off than one rounding.
  assert np.max(np.abs(np.asarray(db_plain, np.float64) - exact) / np.abs(exact)) > 2 ** -8
  # Linear's bias gradient in bfloat16 is the written one.
  lin = layers.Linear(64, 64, kernel_init=layers.normal(0.1), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(lin, nnx.Param)
  g_lin = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(y).astype(jnp.float32)
                                     * dy.astype(jnp.float32)))(params)["bias"][...]
  np.testing.assert_array_equal(np.asarray(g_lin), np.asarray(db))


def test_add_bias_float32_is_the_plain_sum():
  k = jax.random.split(jax.random.key(9), 3)
  y, bias = jax.random.normal(k[0], (3, 5, 7, 16)), jax.random.normal(k[1], (16,))
  dy = jax.random.normal(k[2], y.shape)
  ours = jax.jit(lambda *a: _product_vjp(layers.add_bias, *a))(y, bias, dy)
  plain = jax.jit(lambda *a: _product_vjp(lambda u, b: u + b, *a))(y, bias, dy)
  for mine, ref in zip(ours, plain):
    np.testing.assert_array_equal(np.asarray(mine), np.asarray(ref))
