"""The model family: shapes, parameter counts, masking, no leakage, loss, embeddings, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convmae_jax import models
from convmae_jax.models import dwconv, layers


def _images(n, size, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 3), jnp.float32)


def _noise(n, length, seed=1):
  return jax.random.uniform(jax.random.key(seed), (n, length), jnp.float32)


@pytest.fixture(scope="module")
def tiny64():
  return models.create("convmae_tiny", rngs=nnx.Rngs(0), img_size=64)


# ---------------------------------------------------------------------------------------------
# Shapes and parameter counts.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [96])
def test_tiny_shapes_computed(size):
  # Built and run under one jit each: the same numbers as op-by-op, one compilation instead of one
  # per operation and shape. One size computed; every grid's shapes at 224/160/96 are traced
  # abstractly on Base below (test_base_shapes_abstract).
  g = size // 16
  length = g * g
  keep = int(length * 0.25)
  x = _images(2, size)

  @nnx.jit
  def mae(x, noise):
    model = models.create("convmae_tiny", rngs=nnx.Rngs(0), img_size=size)
    return model(x, noise=noise), model.encode(x, noise=noise)

  (loss, pred, mask), (latent, mask2, ids_restore) = mae(x, _noise(2, length))
  assert loss.shape == () and loss.dtype == jnp.float32 and np.isfinite(float(loss))
  assert pred.shape == (2, length, 16 * 16 * 3)
  assert mask.shape == (2, length)
  assert latent.shape == (2, keep, 64)
  assert ids_restore.shape == (2, length)

  @nnx.jit
  def vit(x):
    clf = models.create("convvit_tiny", rngs=nnx.Rngs(0), img_size=size, num_classes=7)
    return clf(x), clf.features(x)

  logits, feats = vit(x)
  assert logits.shape == (2, 7)
  assert feats["stride4"].shape == (2, size // 4, size // 4, 32)
  assert feats["stride8"].shape == (2, size // 8, size // 8, 48)
  assert feats["stride16"].shape == (2, g, g, 64)


@pytest.mark.parametrize("size", [224, 160, 96])
def test_base_shapes_abstract(size):
  """Base traced abstractly (real graph, no FLOPs): every grid follows img_size."""
  g = size // 16
  length = g * g
  model = nnx.eval_shape(lambda: models.create("convmae_base", rngs=nnx.Rngs(0), img_size=size))
  graphdef, state = nnx.split(model)

  def run(state, x, noise):
    m = nnx.merge(graphdef, state)
    loss, pred, mask = m(x, noise=noise)
    latent, _, ids_restore = m.encode(x, noise=noise)
    return loss, pred, mask, latent, ids_restore

  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  noise = jax.ShapeDtypeStruct((2, length), jnp.float32)
  loss, pred, mask, latent, ids_restore = jax.eval_shape(run, state, x, noise)
  assert loss.shape == ()
  assert pred.shape == (2, length, 768)
  assert mask.shape == (2, length)
  assert latent.shape == (2, int(length * 0.25), 768)
  assert ids_restore.shape == (2, length)
  assert model.pos_embed.shape == (1, length, 768)
  assert model.decoder_pos_embed.shape == (1, length, 512)

  clf = nnx.eval_shape(lambda: models.create("convvit_base", rngs=nnx.Rngs(0), img_size=size))
  cg, cs = nnx.split(clf)
  logits, feats = jax.eval_shape(
      lambda s, x: (nnx.merge(cg, s)(x), nnx.merge(cg, s).features(x)), cs, x)
  assert logits.shape == (2, 1000)
  assert feats["stride4"].shape == (2, size // 4, size // 4, 256)
  assert feats["stride8"].shape == (2, size // 8, size // 8, 384)
  assert feats["stride16"].shape == (2, g, g, 768)


def test_official_parameter_counts():
  mae = nnx.eval_shape(lambda: models.create("convmae_base", rngs=nnx.Rngs(0)))
  assert models.count_params(mae) == 114_790_528  # trainable
  assert models.count_params(mae, models.FrozenPosEmbed) == 150_528 + 100_352
  vit = nnx.eval_shape(lambda: models.create("convvit_base", rngs=nnx.Rngs(0), num_classes=1000))
  assert models.count_params(vit) == 85_374_824


def test_all_sizes_build_abstractly():
  for name in models.names():
    m = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0)))
    assert models.count_params(m) > 0
  small = nnx.eval_shape(lambda: models.create("convmae_small", rngs=nnx.Rngs(0)))
  assert small.config.embed_dims == (128, 256, 384)
  large = nnx.eval_shape(lambda: models.create("convmae_large", rngs=nnx.Rngs(0)))
  assert large.decoder_blocks[0].mlp.fc1.kernel.shape == (512, 4096)  # mlp_ratios[0] rule


# ---------------------------------------------------------------------------------------------
# Masking.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.75, 0.7, 0.5, 0.9])
def test_masking_counts_and_consistency(ratio):
  length = 196
  noise = _noise(4, length, seed=3)
  keep = models.num_visible(length, ratio)
  assert keep == int(length * (1 - ratio))
  ids_keep, mask, ids_restore = models.random_masking(noise, keep)
  mask = np.asarray(mask)
  ids_keep = np.asarray(ids_keep)
  ids_restore = np.asarray(ids_restore)
  assert ids_keep.shape == (4, keep)
  np.testing.assert_array_equal((1 - mask).sum(1), keep)
  ids_shuffle = np.argsort(np.asarray(noise), axis=1)
  for i in range(4):
    np.testing.assert_array_equal(ids_keep[i], ids_shuffle[i, :keep])  # noise order, unsorted
    np.testing.assert_array_equal(np.sort(np.where(mask[i] == 0)[0]), np.sort(ids_keep[i]))
    np.testing.assert_array_equal(ids_shuffle[i][ids_restore[i]], np.arange(length))


def test_mask_upsampling_is_nearest():
  mask = (np.arange(2 * 16) % 3 == 0).astype(np.float32).reshape(2, 16)
  up = np.asarray(models.upsample_mask(jnp.asarray(mask), 4, 4))
  rows, cols = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
  expected = mask.reshape(2, 4, 4)[:, rows // 4, cols // 4]
  np.testing.assert_array_equal(up, expected)


def test_model_visible_count(tiny64):
  latent, mask, _ = tiny64.encode(_images(3, 64), noise=_noise(3, 16))
  assert latent.shape[1] == int(16 * 0.25) == 4
  np.testing.assert_array_equal(np.asarray(mask).sum(1), 12)


def test_noise_drawn_from_masking_stream():
  a = models.create("convmae_tiny", rngs=nnx.Rngs(0, masking=5), img_size=64)
  b = models.create("convmae_tiny", rngs=nnx.Rngs(0, masking=5), img_size=64)
  x = _images(2, 64)
  _, _, m1 = a(x)
  _, _, m2 = a(x)
  _, _, m3 = b(x)
  np.testing.assert_array_equal(np.asarray(m1), np.asarray(m3))  # same seed, same masks
  assert not np.array_equal(np.asarray(m1), np.asarray(m2))       # the stream advances


# ---------------------------------------------------------------------------------------------
# No leakage from masked patches into the encoder.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conv_impl,impl", [("dense", "shift"), ("dense", "lax"),
                                             ("visible", "shift"), ("visible", "lax")])
def test_no_leakage_from_masked_patches(conv_impl, impl):
  model = models.create("convmae_tiny", rngs=nnx.Rngs(0), img_size=64, dwconv_impl=impl,
                        conv_impl=conv_impl)
  x = np.asarray(_images(2, 64))
  noise = _noise(2, 16, seed=7)
  latent, mask, _ = model.encode(jnp.asarray(x), noise=noise)
  pixel_mask = np.asarray(models.upsample_mask(mask, 4, 16))[..., None]  # 1 = removed pixel
  other = np.asarray(_images(2, 64, seed=99)) * 5.0
  x_masked_changed = x * (1 - pixel_mask) + other * pixel_mask
  latent2, _, _ = model.encode(jnp.asarray(x_masked_changed), noise=noise)
  assert float(jnp.max(jnp.abs(latent2 - latent))) <= 1e-6
  # A visible pixel does change the latents.
  r, c = np.argwhere(pixel_mask[0, :, :, 0] == 0)[0]
  x_vis = x.copy()
  x_vis[0, r, c, :] += 1.0
  latent3, _, _ = model.encode(jnp.asarray(x_vis), noise=noise)
  assert float(jnp.max(jnp.abs(latent3 - latent))) > 1e-4


@pytest.mark.parametrize("size,ratio", [(96, 0.75), (64, 0.5)])
def test_visible_only_stages_equal_dense(size, ratio):
  """The visible-only conv stages are an exact re-formulation: same loss, pred and gradients."""
  kw = dict(img_size=size, mask_ratio=ratio)
  dense = models.create("convmae_tiny", rngs=nnx.Rngs(0), conv_impl="dense", **kw)
  vis = models.create("convmae_tiny", rngs=nnx.Rngs(0), conv_impl="visible", **kw)
  length = (size // 16) ** 2
  x, noise = _images(3, size), _noise(3, length, seed=4)

  def loss_and_grads(m):
    gd, params, rest = nnx.split(m, nnx.Param, ...)

    @jax.jit
    def run(params):
      def fn(p):
        loss, pred, _ = nnx.merge(gd, p, rest)(x, noise=noise)
        return loss, pred
      return jax.value_and_grad(fn, has_aux=True)(params)

    (loss, pred), grads = run(params)
    return loss, pred, grads

  la, pa, ga = loss_and_grads(dense)
  lb, pb, gb = loss_and_grads(vis)
  assert abs(float(la) - float(lb)) <= 1e-6 * abs(float(la))
  assert float(jnp.max(jnp.abs(pa - pb))) <= 1e-5
  rel = jax.tree.leaves(jax.tree.map(
      lambda u, v: float(jnp.linalg.norm(u - v) / (jnp.linalg.norm(u) + 1e-12)), ga, gb))
  assert max(rel) <= 1e-5


def test_depthwise_impls_agree():
  """Outputs and gradients: the shift conv (with its written-out backward), autodiff of its taps
  and XLA's grouped conv; a non-square map so that no transposition goes unnoticed."""
  key = jax.random.key(0)
  x = jax.random.normal(key, (2, 12, 9, 8))
  k = jax.random.normal(jax.random.key(1), (5, 5, 1, 8))
  g = jax.random.normal(jax.random.key(2), (2, 12, 9, 8))
  a = dwconv.depthwise_conv_shift(x, k)
  b = dwconv.depthwise_conv_lax(x, k)
  assert float(jnp.max(jnp.abs(a - b))) < 1e-5
  grads = {name: jax.grad(lambda x, k: jnp.sum(f(x, k) * g), argnums=(0, 1))(x, k)
           for name, f in (("shift", dwconv.depthwise_conv_shift), ("lax", dwconv.depthwise_conv_lax),
                           ("autodiff", dwconv._shift_taps))}
  for name in ("lax", "autodiff"):
    for got, want, tol in zip(grads["shift"], grads[name], (1e-5, 1e-4)):   # dx, dkernel
      assert got.shape == want.shape
      assert float(jnp.max(jnp.abs(got - want))) <= tol * float(jnp.max(jnp.abs(want))), name
  # 'VALID' on halo windows (the visible-only path): (6, 8, 7) windows -> (6, 4, 3) outputs.
  w = jax.random.normal(jax.random.key(3), (6, 8, 7, 8))
  gv = jax.random.normal(jax.random.key(4), (6, 4, 3, 8))
  lax_valid = lambda w, k: jax.lax.conv_general_dilated(
      w, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=8)
  assert float(jnp.max(jnp.abs(dwconv.depthwise_conv_valid(w, k) - lax_valid(w, k)))) < 1e-5
  grads = {name: jax.grad(lambda w, k: jnp.sum(f(w, k) * gv), argnums=(0, 1))(w, k)
           for name, f in (("shift", dwconv.depthwise_conv_valid), ("lax", lax_valid),
                           ("autodiff", dwconv._valid_taps))}
  for name in ("lax", "autodiff"):
    for got, want, tol in zip(grads["shift"], grads[name], (1e-5, 1e-4)):
      assert got.shape == want.shape
      assert float(jnp.max(jnp.abs(got - want))) <= tol * float(jnp.max(jnp.abs(want))), name


def _bf16_ulps(got, exact):
  """Largest |got - exact| in units of the bfloat16 spacing at |exact| (2^-7 relative)."""
  exact = np.asarray(exact, np.float64)
  spacing = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - 7)
  return float(np.max(np.abs(np.asarray(got, np.float64) - exact) / spacing))


def test_bfloat16_gelu_and_depthwise_conv_are_float32_rounded_once():
  """bfloat16 GELU and shift conv: computed in float32 and rounded once (bit-equal to that), so
  within one bfloat16 rounding of float64, where rounding every operation (XLA's bfloat16
  arithmetic, the form before) is off by more; gradients stay bfloat16 and near float64."""
  x = jax.random.normal(jax.random.key(0), (2, 12, 9, 16)).astype(jnp.bfloat16)
  k = (0.3 * jax.random.normal(jax.random.key(1), (5, 5, 1, 16))).astype(jnp.bfloat16)
  g = jax.random.normal(jax.random.key(2), x.shape).astype(jnp.bfloat16)
  x32, k32 = x.astype(jnp.float32), k.astype(jnp.float32)

  y = layers.gelu(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y), np.asarray(layers.gelu(x32).astype(jnp.bfloat16)))
  x64 = np.asarray(x32, np.float64)
  erf = np.vectorize(math.erf)
  gelu64 = 0.5 * x64 * (1 + erf(x64 / math.sqrt(2)))
  per_op = 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(1 / math.sqrt(2), jnp.bfloat16)))
  assert _bf16_ulps(y, gelu64) <= 0.5 + 1e-6
  assert _bf16_ulps(per_op, gelu64) > 1.0
  dx = jax.grad(lambda v: jnp.sum(layers.gelu(v).astype(jnp.float32) * g))(x)
  dgelu64 = (0.5 * (1 + erf(x64 / math.sqrt(2)))
             + x64 * np.exp(-x64 ** 2 / 2) / math.sqrt(2 * math.pi))
  assert dx.dtype == jnp.bfloat16
  assert _bf16_ulps(dx, dgelu64 * np.asarray(g, np.float64)) <= 1.0

  y = dwconv.depthwise_conv_shift(x, k)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(y), np.asarray(dwconv.depthwise_conv_shift(x32, k32).astype(jnp.bfloat16)))
  xp64, k64 = np.pad(x64, ((0, 0), (2, 2), (2, 2), (0, 0))), np.asarray(k32, np.float64)
  conv64 = sum(xp64[:, i:i + 12, j:j + 9] * k64[i, j, 0] for i in range(5) for j in range(5))
  assert _bf16_ulps(y, conv64) <= 0.5 + 1e-3              # float32's own rounding, then one bf16
  dx_conv = jax.vjp(dwconv.depthwise_conv_shift, x, k)[1](g)[0]
  np.testing.assert_array_equal(np.asarray(dx_conv), np.asarray(
      dwconv.depthwise_conv_shift(g.astype(jnp.float32), k32[::-1, ::-1]).astype(jnp.bfloat16)))


# ---------------------------------------------------------------------------------------------
# Loss, patchify, position embedding.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_numpy(norm_pix):
  rng = np.random.default_rng(0)
  n, size, p = 3, 32, 16
  images = rng.normal(size=(n, size, size, 3)).astype(np.float32)
  length = (size // p) ** 2
  pred = rng.normal(size=(n, length, p * p * 3)).astype(np.float32)
  mask = np.zeros((n, length), np.float32)
  mask[:, 1:] = 1.0
  mask[1, 0], mask[1, 2] = 1.0, 0.0
  # Independent target: explicit loops over patches.
  target = np.zeros_like(pred)
  for i in range(n):
    for t in range(length):
      r, c = divmod(t, size // p)
      patch = images[i, r * p:(r + 1) * p, c * p:(c + 1) * p, :].astype(np.float64).reshape(-1)
      if norm_pix:
        patch = (patch - patch.mean()) / np.sqrt(patch.var(ddof=1) + 1e-6)
      target[i, t] = patch
  per_patch = ((pred.astype(np.float64) - target) ** 2).mean(-1)
  expected = (per_patch * mask).sum() / mask.sum()
  got = models.masked_patch_loss(jnp.asarray(images), jnp.asarray(pred), jnp.asarray(mask), p,
                                 norm_pix)
  assert abs(float(got) - expected) <= 1e-5 * abs(expected)


def test_patchify_roundtrip_and_order():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 48, 48, 3)).astype(np.float32))
  patches = models.patchify(x, 16)
  assert patches.shape == (2, 9, 768)
  np.testing.assert_array_equal(np.asarray(models.unpatchify(patches, 16)), np.asarray(x))
  # token t = row*3 + col; feature (p*16 + q)*3 + c
  np.testing.assert_array_equal(np.asarray(patches[1, 5, (7 * 16 + 2) * 3 + 1]),
                                np.asarray(x[1, 16 + 7, 2 * 16 + 2, 1]))


@pytest.mark.parametrize("dim,grid", [(768, 14), (512, 14), (64, 6)])
def test_pos_embed_closed_form(dim, grid):
  emb = models.sincos_2d(dim, grid)
  assert emb.shape == (1, grid * grid, dim) and emb.dtype == np.float32
  quarter = dim // 4
  for t in [0, 1, grid, grid * grid - 1, grid + 3]:
    i, j = divmod(t, grid)
    for k in [0, 1, quarter - 1]:
      w = 10000.0 ** (-k / quarter)
      np.testing.assert_allclose(emb[0, t, k], np.sin(j * w), atol=1e-6)
      np.testing.assert_allclose(emb[0, t, quarter + k], np.cos(j * w), atol=1e-6)
      np.testing.assert_allclose(emb[0, t, 2 * quarter + k], np.sin(i * w), atol=1e-6)
      np.testing.assert_allclose(emb[0, t, 3 * quarter + k], np.cos(i * w), atol=1e-6)


def test_model_pos_embeds_are_frozen_sincos(tiny64):
  np.testing.assert_array_equal(np.asarray(tiny64.pos_embed[...]), models.sincos_2d(64, 4))
  np.testing.assert_array_equal(np.asarray(tiny64.decoder_pos_embed[...]), models.sincos_2d(32, 4))
  params = nnx.state(tiny64, nnx.Param)
  assert "pos_embed" not in params and "decoder_pos_embed" not in params


# ---------------------------------------------------------------------------------------------
# Initialisation distributions of the official model.
# ---------------------------------------------------------------------------------------------

def test_init_bounds_follow_official():
  m = models.create("convmae_small", rngs=nnx.Rngs(0), img_size=64)
  c1, c2, d = m.config.embed_dims

  def check_uniform(arr, bound):
    arr = np.asarray(arr)
    assert np.abs(arr).max() <= bound + 1e-7
    assert np.abs(arr).max() > 0.9 * bound
    np.testing.assert_allclose(arr.std(), bound / math.sqrt(3), rtol=0.1)

  check_uniform(m.patch_embed3.proj.kernel[...], math.sqrt(6 / (c2 * 4 + d)))   # 2-D view xavier
  check_uniform(m.patch_embed3.proj.bias[...], 1 / math.sqrt(c2 * 4))
  check_uniform(m.patch_embed1.proj.kernel[...], 1 / math.sqrt(3 * 16))
  check_uniform(m.blocks1[0].attn.kernel[...], 0.2)                              # depthwise fan_in 25
  check_uniform(m.blocks1[0].conv1.kernel[...], 1 / math.sqrt(c1))
  check_uniform(m.blocks3[0].attn.qkv.kernel[...], math.sqrt(6 / (d + 3 * d)))   # fused qkv
  check_uniform(m.stage1_output_decode.kernel[...], 1 / math.sqrt(c1 * 16))
  assert float(jnp.abs(m.blocks3[0].attn.qkv.bias[...]).max()) == 0.0
  np.testing.assert_allclose(np.asarray(m.mask_token[...]).std(), 0.02, rtol=0.25)


# ---------------------------------------------------------------------------------------------
# Dtypes, classifier behaviour, errors.
# ---------------------------------------------------------------------------------------------

def test_bfloat16_compute_keeps_float32_params_and_loss(tiny64):
  m16 = models.create("convmae_tiny", rngs=nnx.Rngs(0), img_size=64, dtype="bfloat16")
  x, noise = _images(2, 64), _noise(2, 16)
  loss32, _, _ = tiny64(x, noise=noise)
  loss16, pred16, _ = m16(x, noise=noise)
  assert loss16.dtype == jnp.float32 and pred16.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(m16)) if hasattr(v, "dtype")
             and jnp.issubdtype(v.dtype, jnp.floating))
  assert abs(float(loss16) - float(loss32)) < 0.05 * float(loss32)


def test_classifier_drop_path_and_eval():
  clf = models.create("convvit_tiny", rngs=nnx.Rngs(0), img_size=32, num_classes=5,
                      drop_path_rate=0.5)
  rates = [b.drop_path.rate for b in [*clf.blocks1, *clf.blocks2, *clf.blocks3]]
  np.testing.assert_allclose(rates, np.linspace(0, 0.5, 4))
  x = _images(4, 32)
  a, b = clf(x), clf(x)
  assert float(jnp.max(jnp.abs(a - b))) > 0  # stochastic in train mode
  clf.eval()
  c, d = clf(x), clf(x)
  np.testing.assert_array_equal(np.asarray(c), np.asarray(d))
  assert models.drop_path_rates((2, 2, 11), 0.1)[4] == pytest.approx(0.1 * 4 / 14)


def test_classifier_without_global_pool():
  clf = models.create("convvit_tiny", rngs=nnx.Rngs(0), img_size=32, global_pool=False,
                      drop_path_rate=0.0)
  assert hasattr(clf, "norm") and not hasattr(clf, "fc_norm")
  assert clf(_images(2, 32)).shape == (2, 1000)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(img_size=100), "100"),
    (dict(img_size=100), "16"),
    (dict(mask_ratio=0.0), "mask_ratio"),
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(dtype="float16"), "float16"),
    (dict(dwconv_impl="fft"), "fft"),
    (dict(conv_impl="sparse"), "sparse"),
])
def test_bad_config_raises_clear_error(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    models.create("convmae_tiny", rngs=nnx.Rngs(0), **kwargs)


def test_bad_names_and_fields():
  with pytest.raises(ValueError, match="convmae_gigantic"):
    models.create("convmae_gigantic", rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="embed_dim_typo"):
    models.create("convmae_tiny", rngs=nnx.Rngs(0), embed_dim_typo=3)
  with pytest.raises(TypeError, match="mask_ratio"):
    models.create("convvit_tiny", rngs=nnx.Rngs(0), mask_ratio=0.5)


def test_bad_input_shapes(tiny64):
  with pytest.raises(ValueError, match="64"):
    tiny64(_images(1, 32))
  with pytest.raises(ValueError, match="noise"):
    tiny64(_images(1, 64), noise=_noise(1, 15))
