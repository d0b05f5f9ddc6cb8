"""FastConvMAE's complementary masks: the groups, equality with separate ConvMAE losses, no leak
between groups, config errors, the recipe config."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convmae_jax import configs, models
from convmae_jax.models import masking


def _images(n, size, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 3), jnp.float32)


def _noise(n, length, seed=1):
  return jax.random.uniform(jax.random.key(seed), (n, length), jnp.float32)


@pytest.mark.parametrize("groups,length", [(4, 16), (2, 36), (5, 25)])
def test_groups_are_disjoint_cover_every_token_and_follow_the_shuffle(groups, length):
  noise = _noise(3, length, seed=groups)
  rows = masking.complementary_noise(noise, groups)
  assert rows.shape == (3 * groups, length)
  size = length // groups
  ids_keep, mask, _ = masking.random_masking(rows, size)
  ids_shuffle = np.argsort(np.asarray(noise), axis=1)
  ids_keep = np.asarray(ids_keep).reshape(3, groups, size)
  mask = np.asarray(mask).reshape(3, groups, length)
  for n in range(3):
    for g in range(groups):
      np.testing.assert_array_equal(ids_keep[n, g], ids_shuffle[n, g * size:(g + 1) * size])
    # Each token is visible in exactly one group.
    np.testing.assert_array_equal((1 - mask[n]).sum(axis=0), np.ones(length))
    assert sorted(ids_keep[n].reshape(-1).tolist()) == list(range(length))


def _pair(conv_impl, size, ratio, dwconv_impl="auto"):
  comp = models.create("convmae_tiny", rngs=nnx.Rngs(0), img_size=size, mask_ratio=ratio,
                       conv_impl=conv_impl, dwconv_impl=dwconv_impl, complementary_masks=True)
  plain = models.ConvMAE(dataclasses.replace(comp.config, complementary_masks=False),
                         rngs=nnx.Rngs(0))
  return comp, plain


@pytest.mark.parametrize("conv_impl,size,ratio", [("visible", 64, 0.75), ("dense", 64, 0.75),
                                                  ("visible", 96, 0.5)])
def test_loss_and_grads_equal_the_mean_of_separate_convmae_losses(conv_impl, size, ratio):
  comp, plain = _pair(conv_impl, size, ratio)
  groups = comp.config.num_groups
  assert groups == round(1 / (1 - ratio))
  gdef_c, params, rest_c = nnx.split(comp, nnx.Param, ...)
  gdef_p, _, rest_p = nnx.split(plain, nnx.Param, ...)
  length = comp.num_patches
  images, noise = _images(3, size), _noise(3, length)

  def complementary(p):
    return nnx.merge(gdef_c, p, rest_c)(images, noise=noise)[0]

  def separate(p):
    rows = masking.complementary_noise(noise, groups).reshape(3, groups, length)
    model = nnx.merge(gdef_p, p, rest_p)
    return sum(model(images, noise=rows[:, g])[0] for g in range(groups)) / groups

  loss_c, grads_c = jax.jit(jax.value_and_grad(complementary))(params)
  loss_s, grads_s = jax.jit(jax.value_and_grad(separate))(params)
  assert abs(float(loss_c) - float(loss_s)) <= 1e-5 * abs(float(loss_s))
  worst = 0.0
  for a, b in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads_s)):
    worst = max(worst, float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-30)))
  assert worst <= 1e-5, worst


def test_outputs_have_one_row_per_group_and_both_conv_impls_agree():
  comp_v, _ = _pair("visible", 64, 0.75, "lax")
  comp_d = models.create("convmae_tiny", rngs=nnx.Rngs(0), img_size=64, conv_impl="dense",
                         dwconv_impl="shift", complementary_masks=True)
  images, noise = _images(2, 64), _noise(2, 16)
  loss_v, pred_v, mask_v = nnx.jit(lambda m: m(images, noise=noise))(comp_v)
  loss_d, pred_d, mask_d = nnx.jit(lambda m: m(images, noise=noise))(comp_d)
  assert pred_v.shape == (8, 16, 16 * 16 * 3) and mask_v.shape == (8, 16)
  np.testing.assert_array_equal(np.asarray(mask_v), np.asarray(mask_d))
  np.testing.assert_allclose(np.asarray(pred_v), np.asarray(pred_d), atol=2e-5)
  assert abs(float(loss_v) - float(loss_d)) <= 1e-5


@pytest.mark.parametrize("conv_impl", ["visible", "dense"])
def test_no_group_sees_another_groups_pixels(conv_impl):
  model = models.create("convmae_tiny", rngs=nnx.Rngs(0), img_size=64, conv_impl=conv_impl,
                        complementary_masks=True)
  x = np.asarray(_images(1, 64))
  noise = _noise(1, 16, seed=7)
  encode = nnx.jit(lambda m, x: m.encode(x, noise=noise))
  latent, mask, _ = encode(model, jnp.asarray(x))                        # 4 rows: the groups
  other = np.asarray(_images(1, 64, seed=99)) * 5.0
  for g in range(4):
    in_group = 1 - np.asarray(models.upsample_mask(mask[g:g + 1], 4, 16))[0, ..., None]
    # Change every pixel outside group g: group g's latents stay, every other group's change.
    changed = x * in_group + other * (1 - in_group)
    latent2, _, _ = encode(model, jnp.asarray(changed))
    assert float(jnp.max(jnp.abs(latent2[g] - latent[g]))) <= 1e-6
    for h in set(range(4)) - {g}:
      assert float(jnp.max(jnp.abs(latent2[h] - latent[h]))) > 1e-4


@pytest.mark.parametrize("overrides,needle", [
    (dict(img_size=64, mask_ratio=0.7), "1/(1 - mask_ratio) to be an integer"),
    (dict(img_size=80, mask_ratio=0.75), "multiple of 4"),   # 25 tokens, groups of 4
])
def test_bad_complementary_settings_are_refused(overrides, needle):
  with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
    models.create("convmae_tiny", rngs=nnx.Rngs(0), complementary_masks=True, **overrides)


def test_fastconvmae_recipe_config():
  cfg = configs.get_config("fastconvmae")
  assert cfg.complementary_masks is True and cfg.mask_ratio == 0.75 and cfg.norm_pix_loss is True
  assert (cfg.num_epochs, cfg.warmup_epochs, cfg.batch_size) == (50, 10, 512)
  assert cfg.blr == pytest.approx(6e-4) and cfg.weight_decay == pytest.approx(0.05)
  assert cfg.model == "convmae_base"


def test_trainer_runs_with_complementary_masks(tmp_path):
  from test_train import run   # the tiny mock-ImageNet pretraining run of tests/test_train.py
  result = run(tmp_path, num_train_steps=2, warmup_steps=0, complementary_masks=True,
               recon_at_end=True, recon_num_images=2)
  assert sorted(result.losses) == [1, 2]
  assert all(np.isfinite(v) and 0.2 < v < 5.0 for v in result.losses.values())
  assert result.model.config.complementary_masks and result.model.config.num_groups == 4
  from PIL import Image
  figure = np.asarray(Image.open(tmp_path / "reconstructions" / "step_000002.png"))
  # One figure row per image (its first group's mask), not one per group: 2 rows of 32 px + pads.
  assert figure.shape[:2] == (2 * 34 + 2, 4 * 34 + 2)
