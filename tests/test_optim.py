"""Fine-tuning AdamW with layer-wise lr decay, linear-probe LARS and the pretraining AdamW, each
checked against a numpy transcription of the official (PyTorch) update."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from convmae_jax import models
from convmae_jax.train import optim


@pytest.fixture(scope="module")
def base_params():
  model = nnx.eval_shape(lambda: models.create("convvit_base", rngs=nnx.Rngs(0), num_classes=1000))
  return nnx.state(model, nnx.Param)


@pytest.fixture(scope="module")
def tiny_params():
  """The real tiny ConvViT parameter tree, filled with random values (eager init is slow on CPU)."""
  model = nnx.eval_shape(lambda: models.create("convvit_tiny", rngs=nnx.Rngs(0), num_classes=10,
                                               img_size=32))
  rng = np.random.default_rng(2)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.02, s.shape), jnp.float32),
                      nnx.state(model, nnx.Param))


def _flat(tree):
  """{'blocks3.0.attn.qkv.kernel': leaf} from an nnx State / pure dict (values unwrapped)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [str(n) for n in optim._path_names(path)]
    out[".".join(names)] = leaf
  return out


def _config(**kw):
  return ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, weight_decay=0.05, layer_decay=0.65, **kw))


# ===================================== Layer-wise lr decay =========================================

def test_layer_id_rule():
  assert optim.layer_id(("pos_embed",), 12) == 0
  assert optim.layer_id(("cls_token",), 12) == 0
  assert optim.layer_id(("patch_embed4", "kernel"), 12) == 0
  assert optim.layer_id(("blocks2", 1, "mlp", "fc1", "bias"), 12) == 0
  assert optim.layer_id(("blocks3", 0, "attn", "qkv", "kernel"), 12) == 1
  assert optim.layer_id(("blocks3", "10", "norm1", "scale"), 12) == 11
  assert optim.layer_id(("head", "kernel"), 12) == 12
  assert optim.layer_id(("norm", "scale"), 12) == 12
  key_path = (jax.tree_util.DictKey("blocks3"), jax.tree_util.DictKey(4),
              jax.tree_util.GetAttrKey("value"))
  assert optim.layer_id(key_path, 12) == 5


def test_lr_scales_of_convvit_base_follow_the_official_table(base_params):
  scales = _flat(optim.layer_lr_scales(base_params, 0.65))
  assert set(scales) == set(_flat(base_params))
  layer0 = 0.65 ** 12
  assert layer0 == pytest.approx(0.005688, rel=1e-3)
  for name in ("pos_embed", "patch_embed1.proj.kernel", "patch_embed2.norm.scale",
               "patch_embed3.proj.bias", "patch_embed4.kernel", "patch_embed4.bias",
               "blocks1.0.attn.kernel", "blocks1.1.mlp.fc2.bias", "blocks2.1.conv1.kernel"):
    assert scales[name] == pytest.approx(layer0, rel=1e-12), name
  for i in range(11):
    want = 0.65 ** (11 - i)
    for leaf in ("attn.qkv.kernel", "attn.proj.bias", "mlp.fc1.kernel", "norm2.scale"):
      assert scales[f"blocks3.{i}.{leaf}"] == pytest.approx(want, rel=1e-12), (i, leaf)
  assert scales["blocks3.0.attn.qkv.kernel"] == pytest.approx(0.008751, rel=1e-3)
  assert scales["blocks3.10.mlp.fc2.kernel"] == pytest.approx(0.65, rel=1e-12)
  for name in ("fc_norm.scale", "fc_norm.bias", "head.kernel", "head.bias"):
    assert scales[name] == 1.0, name
  # 13 distinct groups: layer 0, blocks3[0..10], the head layer.
  assert len({round(v, 15) for v in scales.values()}) == 13


def test_finetune_decay_mask_is_the_official_set(base_params):
  mask = _flat(optim.finetune_decay_mask(base_params))
  # CBlock: 5 kernels / 5 biases + 2 LayerNorms; Block: 4 / 4 + 2 LayerNorms; PatchEmbed: conv
  # kernel / bias + LayerNorm; patch_embed4, head: kernel / bias; fc_norm, pos_embed: undecayed.
  assert sum(mask.values()) == 4 * 5 + 11 * 4 + 3 * 1 + 1 + 1 == 69
  assert sum(not v for v in mask.values()) == 4 * 9 + 11 * 8 + 3 * 3 + 1 + 1 + 2 + 1 == 138
  assert mask["pos_embed"] is False                          # (1, 196, 768) but no_weight_decay
  for name in ("head.kernel", "patch_embed1.proj.kernel", "patch_embed4.kernel",
               "blocks1.0.attn.kernel", "blocks3.5.attn.qkv.kernel"):
    assert mask[name] is True, name
  for name in ("head.bias", "fc_norm.scale", "blocks3.0.norm1.bias", "patch_embed4.bias",
               "patch_embed2.norm.scale"):
    assert mask[name] is False, name


# ===================================== Fine-tuning AdamW ===========================================

def _adamw_reference(params, grads_seq, lrs, scales, decay, *, b1, b2, eps, wd,
                     float32_bias_correction=False):
  """PyTorch AdamW with per-group lr = lr(t) * scale; yields each step's update p_new - p_old.

  ``params`` after step t are those the optimizer produced (float32), so only one step's
  float error enters each comparison. ``float32_bias_correction``: ``1 - b**t`` in float32, as
  optax computes it (PyTorch uses Python floats): 1 - float32(0.999) is 1.3e-5 off 0.001, a
  6.6e-6 relative difference in the first steps that has nothing to do with the update rule.
  """
  m = {k: np.zeros_like(v, np.float64) for k, v in grads_seq[0].items()}
  v = {k: np.zeros_like(x, np.float64) for k, x in grads_seq[0].items()}
  for t, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
    upd = {}
    for k, g in grads.items():
      g = g.astype(np.float64)
      p = params[t - 1][k].astype(np.float64)
      group_lr = lr * scales[k]
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      if float32_bias_correction:
        bc1 = float(np.float32(1) - np.float32(b1) ** np.float32(t))
        bc2 = float(np.float32(1) - np.float32(b2) ** np.float32(t))
      else:
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
      denom = np.sqrt(v[k]) / np.sqrt(bc2) + eps
      step = group_lr / bc1 * m[k] / denom
      upd[k] = -group_lr * (wd if decay[k] else 0.0) * p - step
    yield upd


def test_finetune_adamw_equals_pytorch_param_groups(tiny_params):
  cfg = _config()
  schedule = lambda step: 1e-3 * (1.0 + step)  # lr changes each step
  tx = optim.make_finetune_optimizer(cfg, schedule, tiny_params)
  scales, decay = _flat(optim.layer_lr_scales(tiny_params, 0.65)), _flat(
      optim.finetune_decay_mask(tiny_params))
  assert min(scales.values()) == pytest.approx(0.65 ** 3)    # tiny: 2 blocks3 → 3 layers

  rng = np.random.default_rng(0)
  params = tiny_params
  state = tx.init(params)
  update = jax.jit(tx.update)
  grads_seq, params_seq, updates_seq = [], [{k: np.asarray(p) for k, p in _flat(params).items()}], []
  for _ in range(2):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    grads_seq.append({k: np.asarray(g) for k, g in _flat(grads).items()})
    params_seq.append({k: np.asarray(p) for k, p in _flat(params).items()})
    updates_seq.append({k: np.asarray(u) for k, u in _flat(updates).items()})

  for f32_bc, rtol in ((True, 1e-6), (False, 1e-5)):  # optax's float32 bias correction, exact
    ref = _adamw_reference(params_seq, grads_seq, [1e-3, 2e-3], scales, decay, b1=0.9, b2=0.999,
                           eps=1e-8, wd=0.05, float32_bias_correction=f32_bc)
    for got, want in zip(updates_seq, ref):
      for k in want:
        # atol relative to the leaf's largest update: where the decay and Adam terms nearly
        # cancel, float32 rounding of each term exceeds rtol of their tiny sum.
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=rtol * np.abs(want[k]).max(),
                                   err_msg=str((k, f32_bc)))
  # Step 1 of Adam moves each undecayed entry by lr * scale (|g| >> eps): 1e-3 at the head,
  # 1e-3 * 0.65**3 in layer 0.
  np.testing.assert_allclose(np.abs(updates_seq[0]["head.bias"]), 1e-3, rtol=1e-5)
  np.testing.assert_allclose(np.abs(updates_seq[0]["patch_embed1.proj.bias"]), 1e-3 * 0.65 ** 3,
                             rtol=1e-5)


def test_finetune_optimizer_state_maps_over_params(tiny_params):
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), tiny_params)
  tx = optim.make_finetune_optimizer(_config(), lambda s: 1e-3, abstract)
  state = jax.eval_shape(tx.init, abstract)
  # As sharding.opt_state_shardings does: params' twins get f, the rest (counts) the other map.
  mapped = optax.tree_map_params(tx, lambda _, p: f"param{p.shape}", state, abstract,
                                 transform_non_params=lambda _: "other")
  mu, nu = _flat(optax.tree.get(mapped, "mu")), _flat(optax.tree.get(mapped, "nu"))
  assert mu["head.kernel"] == nu["head.kernel"] == "param(64, 10)"
  leaves = jax.tree.leaves(mapped)
  assert leaves.count("other") == 2                             # Adam's and the schedule's count
  assert len(leaves) == 2 + 2 * len(_flat(abstract))            # mu and nu mirror the params


# ===================================== LARS ========================================================

def _lars_reference(params, grads_seq, lrs, *, wd, momentum=0.9, trust=0.001):
  """MoCo-v3 LARS.step() in numpy float64; returns the final params."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in p.items()}
  for grads, lr in zip(grads_seq, lrs):
    for k, g in grads.items():
      dp = g.astype(np.float64)
      if p[k].ndim > 1:
        dp = dp + wd * p[k]
        pn, un = np.linalg.norm(p[k]), np.linalg.norm(dp)
        q = trust * pn / un if (pn > 0 and un > 0) else 1.0
        dp = dp * q
      mu[k] = momentum * mu[k] + dp
      p[k] = p[k] - lr * mu[k]
  return p


def _run(tx, params, grads_seq):
  state = tx.init(params)
  for g in grads_seq:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


def _lars_problem():
  rng = np.random.default_rng(1)
  params = {"kernel": rng.normal(size=(6, 4)).astype(np.float32),
            "zero_kernel": np.zeros((3, 5), np.float32),        # ||p|| = 0: trust ratio 1
            "bias": rng.normal(size=(4,)).astype(np.float32)}   # 1-D: no decay, no trust ratio
  grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
               for _ in range(3)]
  grads_seq[1]["kernel"] = np.zeros((6, 4), np.float32)       # with wd = 0 this is ||g|| = 0
  return params, grads_seq


@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_lars_equals_mocov3(wd):
  params, grads_seq = _lars_problem()
  schedule = lambda step: jnp.array([0.5, 2.0, 1.0])[step]
  tx = optim.make_lars_optimizer(ml_collections.ConfigDict(dict(weight_decay=wd)), schedule, params)
  got = _run(tx, jax.tree.map(jnp.asarray, params), [jax.tree.map(jnp.asarray, g) for g in grads_seq])
  want = _lars_reference(params, grads_seq, [0.5, 2.0, 1.0], wd=wd)
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-6, atol=1e-7, err_msg=k)
  # The zero kernel moved by the plain momentum SGD step (trust ratio 1 while its norm was 0).
  assert np.abs(np.asarray(got["zero_kernel"])).max() > 0.1


def test_optax_lars_differs_under_a_schedule():
  """optax.lars applies lr before the momentum trace: same as MoCo-v3 only at constant lr."""
  params, grads_seq = _lars_problem()
  cfg = ml_collections.ConfigDict(dict(weight_decay=0.0))
  mask = optim.lars_mask(params)
  jparams = jax.tree.map(jnp.asarray, params)
  jgrads = [jax.tree.map(jnp.asarray, g) for g in grads_seq]

  def both(schedule):
    ours = _run(optim.make_lars_optimizer(cfg, schedule, params), jparams, jgrads)
    theirs = _run(optax.lars(schedule, weight_decay_mask=mask, trust_ratio_mask=mask), jparams,
                  jgrads)
    return {k: float(np.abs(np.asarray(ours[k]) - np.asarray(theirs[k])).max()) for k in params}

  constant = both(lambda step: 0.7)
  assert max(constant.values()) < 1e-6                          # same masks, constant lr: same
  changing = both(lambda step: jnp.array([0.5, 2.0, 1.0])[step])
  assert changing["kernel"] > 1e-4 and changing["bias"] > 1e-2  # lr before the trace: differs


# ===================================== Pretraining AdamW (unchanged) ===============================

def test_pretraining_optimizer_unchanged():
  cfg = ml_collections.ConfigDict(dict(b1=0.9, b2=0.95, weight_decay=0.05))
  params = {"w": jnp.full((2, 3), 0.5), "b": jnp.full((3,), 0.5)}
  grads = {"w": jnp.full((2, 3), 0.1), "b": jnp.full((3,), -0.2)}
  tx = optim.make_optimizer(cfg, lambda step: 1e-2, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Step 1: Adam's bias-corrected step is sign(g) (|g| >> eps), plus decoupled decay on w only.
  np.testing.assert_allclose(updates["w"], -1e-2 * (1.0 + 0.05 * 0.5), rtol=1e-6)
  np.testing.assert_allclose(updates["b"], 1e-2, rtol=1e-6)
  assert jax.tree.map(bool, optim.weight_decay_mask(params)) == {"w": True, "b": False}


def test_schedule_numbers_are_arguments_not_constants():
  """The step takes the schedule's numbers as an argument: two schedules that differ in lr, warmup
  and length trace to the same program, and its values equal the schedule's own (to 1 ulp)."""
  a = optim.warmup_cosine_schedule(peak_lr=2.4e-3, warmup_steps=12.5, total_steps=500, min_lr=0.0)
  b = optim.warmup_cosine_schedule(peak_lr=1e-3, warmup_steps=5.5, total_steps=100, min_lr=1e-6)
  trace = lambda s: str(jax.make_jaxpr(lambda step, h: s(step, h))(jnp.int32(3), s.hparams()))
  assert trace(a) == trace(b)
  steps = jnp.arange(0, 503)
  with_args = jax.jit(lambda st, h: jax.vmap(lambda x: a(x, h))(st))(steps, a.hparams())
  np.testing.assert_allclose(np.asarray(with_args), np.asarray(jax.vmap(a)(steps)), rtol=2e-7,
                             atol=0)
  assert float(with_args[0]) == 0.0 and float(with_args[500]) == 0.0
  np.testing.assert_allclose(float(with_args[12]), 2.4e-3 * 12 / 12.5, rtol=1e-6)
