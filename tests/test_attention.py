"""attention_impl: `jax.nn.dot_product_attention` ("xla") computes what the explicit matmuls
compute, forward and backward, with and without relative-position terms and an external bias; the
choice reaches every attention layer, round-trips through the config, and bad choices fail early.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convmae_jax import models
from convmae_jax.models import layers, transformer

DIM, HEADS, GRID, BATCH = 32, 4, (3, 4), 2
LENGTH = GRID[0] * GRID[1]


def _max_abs(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _attention(rel_pos, heads=HEADS):
  attn = transformer.Attention(DIM, heads, kernel_init=layers.xavier_uniform, rel_pos=rel_pos,
                          rel_pos_grid=GRID if rel_pos != "none" else None,
                          attention_impl="explicit", rngs=nnx.Rngs(0))
  # Relative-position tables start at zero; random values make their terms count.
  params = nnx.state(attn, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
  nnx.update(attn, jax.tree.map(lambda p: p + 0.2 * jax.random.normal(next(keys), p.shape), params))
  return attn


def _outputs_and_grads(attn, x, bias, cotangent):
  """{impl: (output, gradients w.r.t. (params, x, bias))} for "explicit" and "xla", one program."""
  graphdef, params, rest = nnx.split(attn, nnx.Param, ...)

  def f(params, x, bias, impl):
    module = nnx.merge(graphdef, params, rest)
    module.attention_impl = impl
    y = module(x, bias)
    return jnp.sum(y * cotangent), y

  @jax.jit
  def run(params, x, bias):
    return {impl: jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(params, x, bias, impl)
            for impl in ("explicit", "xla")}

  return {impl: (y, grads) for impl, ((_, y), grads) in run(params, x, bias).items()}


@pytest.mark.parametrize("rel_pos,bias_shape", [
    ("none", None), ("table", None), ("decomposed", None),
    ("none", (HEADS, LENGTH, LENGTH)),                 # shared table, as the backbone passes it
    ("decomposed", (BATCH, 1, LENGTH, LENGTH)),        # q-dependent term plus a per-sample bias
])
def test_xla_matches_explicit_forward_and_gradients(rel_pos, bias_shape):
  attn = _attention(rel_pos)
  x = jax.random.normal(jax.random.key(2), (BATCH, LENGTH, DIM))
  bias = (None if bias_shape is None else jax.random.normal(jax.random.key(3), bias_shape))
  # Output cotangent scaled so that the gradients are of order 1 (at most about 2.5 here).
  cotangent = 0.1 * jax.random.normal(jax.random.key(4), (BATCH, LENGTH, DIM))
  results = _outputs_and_grads(attn, x, bias, cotangent)
  (y_exp, g_exp), (y_xla, g_xla) = results["explicit"], results["xla"]
  out_err, grad_err = _max_abs(y_exp, y_xla), _max_abs(g_exp, g_xla)
  print(f"\n{rel_pos} bias={bias_shape}: output max abs {out_err:.2e}, gradients {grad_err:.2e}")
  assert out_err <= 1e-5 and grad_err <= 1e-5
  # The relative-position parameters and the input do get gradients (not a vacuous match).
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(g_exp[:2]))


def test_tiny_convmae_loss_matches():
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  noise = jax.random.uniform(jax.random.key(1), (2, 16))
  out = {}
  for impl in ("explicit", "xla"):
    model = models.create("convmae_tiny", rngs=nnx.Rngs(0), img_size=64, attention_impl=impl)
    graphdef, state = nnx.split(model)
    out[impl] = jax.jit(lambda s: nnx.merge(graphdef, s)(images, noise=noise)[:2])(state)
  loss_err = abs(float(out["explicit"][0]) - float(out["xla"][0]))
  pred_err = _max_abs(out["explicit"][1], out["xla"][1])
  print(f"\nconvmae_tiny loss {float(out['explicit'][0]):.6f}: loss max abs difference "
        f"{loss_err:.2e}, predictions {pred_err:.2e}")
  assert loss_err <= 1e-5 and pred_err <= 1e-5


def test_every_attention_layer_gets_the_choice():
  for name, kw in (("convmae_tiny", {}), ("convvit_tiny", {}),
                   ("convvit_det_tiny", dict(img_size=64, window_size=2)),
                   ("convvit_vitdet_tiny", dict(img_size=64, window_size=2))):
    model = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0), attention_impl="xla",
                                                 **kw))
    impls = [m.attention_impl for _, m in nnx.iter_graph(model) if isinstance(m, transformer.Attention)]
    expected = 3 if name == "convmae_tiny" else 2          # tiny: 2 encoder (+ 1 decoder) blocks
    assert impls == ["xla"] * expected, (name, impls)


def test_config_round_trip_and_old_metadata():
  cfg = models.config_for("convmae_tiny", attention_impl="xla")
  d = cfg.to_dict()
  assert d["attention_impl"] == "xla" and models.config_for("convmae_tiny", **d) == cfg
  del d["attention_impl"]                                 # metadata written before the field
  assert models.config_for("convmae_tiny", **d).attention_impl == "auto"
  assert models.config_for("convvit_det_tiny").attention_impl == "auto"


@pytest.mark.parametrize("name", ["convmae_tiny", "convvit_tiny", "convvit_seg_tiny"])
def test_bad_value_names_it_and_the_accepted_ones(name):
  with pytest.raises(ValueError, match=r"attention_impl 'flash' is not one of \('auto', "
                                       r"'explicit', 'xla', 'cudnn'\)"):
    models.config_for(name, attention_impl="flash")
  with pytest.raises(ValueError, match="'flash'"):
    transformer.Attention(8, 2, kernel_init=layers.xavier_uniform, attention_impl="flash",
                     rngs=nnx.Rngs(0))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal off a GPU")
def test_cudnn_off_a_gpu_fails_before_compute():
  model = models.create("convmae_tiny", rngs=nnx.Rngs(0), img_size=32, dtype="bfloat16",
                        attention_impl="cudnn")
  images = jnp.zeros((1, 32, 32, 3))
  noise = jnp.zeros((1, 4))
  with pytest.raises(ValueError, match=r"attention_impl='cudnn' cannot run here: the default "
                                       r"JAX backend is '\w+', not a CUDA GPU"):
    jax.eval_shape(lambda: model(images, noise=noise))      # traced only: nothing computed


def test_auto_resolution(monkeypatch):
  bf16, f32 = jnp.bfloat16, jnp.float32
  resolve = transformer.resolve_attention_impl
  for impl in ("explicit", "xla"):
    assert resolve(impl, dtype=bf16, head_dim=64, length=196, has_bias=True) == impl
  if jax.default_backend() == "cpu":
    for dt in (bf16, f32):
      assert resolve("auto", dtype=dt, head_dim=64, length=196, has_bias=False) == "explicit"
  # The rules on a (pretend) CUDA GPU of compute capability >= 8.0 with the 128 head_dim limit.
  monkeypatch.setattr(transformer, "_cudnn_device_problem", lambda: None)
  monkeypatch.setattr(transformer, "_cudnn_max_head_dim", lambda: 128)
  assert resolve("auto", dtype=bf16, head_dim=64, length=49, has_bias=False) == "cudnn"
  assert resolve("auto", dtype=bf16, head_dim=64, length=256, has_bias=True) == "cudnn"
  assert resolve("auto", dtype=f32, head_dim=64, length=196, has_bias=False) == "explicit"
  assert resolve("auto", dtype=bf16, head_dim=20, length=196, has_bias=False) == "explicit"
  assert resolve("auto", dtype=bf16, head_dim=256, length=196, has_bias=False) == "explicit"
  assert resolve("auto", dtype=bf16, head_dim=64, length=49, has_bias=True) == "explicit"
  assert resolve("cudnn", dtype=bf16, head_dim=64, length=196, has_bias=True) == "cudnn"
  with pytest.raises(ValueError, match="float32 .*bfloat16"):
    resolve("cudnn", dtype=f32, head_dim=64, length=196, has_bias=False)


def _reference_explicit(attn, x, bias):
  """The explicit attention as the official code writes it: q, k, v indexed out of a
  (3, B, heads, L, hd) view of the fused projection, the scale applied to the q·k scores."""
  b, length, d = x.shape
  h = attn.num_heads
  qkv = attn.qkv(x).reshape(b, length, 3, h, d // h).transpose(2, 0, 3, 1, 4)
  q, k, v = qkv[0], qkv[1], qkv[2]
  scores = (q @ k.swapaxes(-1, -2)).astype(jnp.float32) * attn.scale
  if attn.rel_pos == "table":
    scores = scores + transformer.table_bias(attn.relative_position_bias_table[...], GRID)
  elif attn.rel_pos == "decomposed":
    scores = transformer.decomposed_bias(scores, q, attn.rel_pos_h[...], attn.rel_pos_w[...], GRID)
  if bias is not None:
    scores = scores + bias
  probs = jax.nn.softmax(scores, axis=-1)
  return attn.proj((probs @ v).transpose(0, 2, 1, 3).reshape(b, length, d))


@pytest.mark.parametrize("heads,rel_pos", [(2, "none"), (2, "decomposed"), (4, "table"),
                                           (8, "none")])
def test_explicit_split_and_scale_match_the_official_formulation(heads, rel_pos):
  """The explicit path splits the fused projection (one concatenation in the backward pass) and,
  when the scale is a power of two (head_dim 16: 2^-2; head_dim 4 with 8 heads: 2^-1), scales q
  instead of the scores; head_dim 8 (4 heads, scale 2^-1.5) keeps the scores' scaling. Forward and
  gradients equal the official formulation to float32 reordering."""
  attn = _attention(rel_pos, heads)
  assert transformer._exact_power_of_two(attn.scale) == (heads != 4)
  graphdef, params, rest = nnx.split(attn, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(2), (BATCH, LENGTH, DIM))
  bias = jax.random.normal(jax.random.key(3), (heads, LENGTH, LENGTH))
  cotangent = 0.1 * jax.random.normal(jax.random.key(4), (BATCH, LENGTH, DIM))

  def loss(params, x, form):
    module = nnx.merge(graphdef, params, rest)
    y = module(x, bias) if form == "model" else _reference_explicit(module, x, bias)
    return jnp.sum(y * cotangent), y

  run = jax.jit(lambda p, x, form: jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      p, x, form), static_argnums=2)
  (_, y_model), g_model = run(params, x, "model")
  (_, y_ref), g_ref = run(params, x, "reference")
  out_err, grad_err = _max_abs(y_model, y_ref), _max_abs(g_model, g_ref)
  print(f"\nheads={heads} {rel_pos}: output max abs {out_err:.2e}, gradients {grad_err:.2e}")
  assert out_err <= 1e-6 and grad_err <= 1e-6
  assert float(jnp.max(jnp.abs(y_ref))) > 0.1 and float(jnp.max(jnp.abs(g_ref[1]))) > 0.01
