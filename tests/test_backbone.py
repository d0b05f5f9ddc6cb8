"""Detection / segmentation backbones (convvit_{det,seg,vitdet}_*): shapes, attention layout,
relative positions, official keys (backbone_facts.json), round trips, parity with the PyTorch twins,
loading pretraining checkpoints, bad input.

CPU, tiny widths; Base models only as abstract shapes (nnx.eval_shape / jax.eval_shape).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from flax import nnx  # noqa: E402

from convmae_jax import models, weights  # noqa: E402
from convmae_jax.interop import backbone as ib  # noqa: E402
from convmae_jax.interop import torch_backbone as tb  # noqa: E402
from convmae_jax.models import layers, transformer  # noqa: E402
from convmae_jax.models.pos_embed import resize_pos_embed  # noqa: E402

# State-dict keys, shapes, buffers, parameter counts and output shapes of the official detection
# (DET/models/convmae.py) and segmentation (SEG/backbone/convmae.py) backbones, measured by
# instantiating the official classes (see the file's "about"); written independently of this code.
FACTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                          "official_backbone_facts.json")
PRESETS = ("det", "seg", "vitdet")
PARITY_ATOL = 1e-5
TINY = models.SIZES["tiny"]


def _facts():
  if not os.path.isfile(FACTS_PATH):
    pytest.skip(f"{FACTS_PATH} not present")
  with open(FACTS_PATH) as f:
    return json.load(f)


def _abstract(name, **kw):
  return nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0), **kw))


def _feature_shapes(model, size):
  gd, st = nnx.split(model)
  out = jax.eval_shape(lambda st, x: nnx.merge(gd, st).features(x), st,
                       jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return {k: tuple(v.shape) for k, v in out.items()}


def _randomize(model, seed):
  """Every float variable (tables, gammas, BN statistics included) set to N(0, 0.1²) values, BN
  running variances to positive ones, so nothing is tested at its zero / one initial value."""
  filt = nnx.Any(nnx.Param, models.FrozenPosEmbed, nnx.BatchStat)
  state = nnx.state(model, filt)
  rng = np.random.default_rng(seed)
  flat = nnx.to_flat_state(state)
  for path, var in flat:
    v = var[...]
    if jnp.issubdtype(v.dtype, jnp.integer):
      var[...] = jnp.full(v.shape, 7, v.dtype)
      continue
    a = 0.1 * rng.standard_normal(v.shape).astype(np.float32)
    if path[-1] == "running_var":
      a = np.abs(a) + 0.5
    var[...] = jnp.asarray(a)
  nnx.update(model, nnx.from_flat_state(flat))


def _jit_features(model):
  gd, st = nnx.split(model)
  return lambda x: jax.jit(lambda st, x: nnx.merge(gd, st).features(x))(st, x)


# ------------------------------------------------------------------------------------------------
# shapes and layout


@pytest.mark.parametrize("size", [1024, 512])
@pytest.mark.parametrize("preset", PRESETS)
def test_output_shapes_and_channels(preset, size):
  m = _abstract(f"convvit_{preset}_tiny", img_size=size)
  c1, c2, d = TINY["embed_dims"]
  want = {"stride4": (1, size // 4, size // 4, c1), "stride8": (1, size // 8, size // 8, c2),
          "stride16": (1, size // 16, size // 16, d)}
  if preset == "det":
    want["stride32"] = (1, size // 32, size // 32, d)
  if preset == "seg":                                 # 3x3 stride-2 conv, no padding
    g = size // 16
    want["stride32"] = (1, (g - 3) // 2 + 1, (g - 3) // 2 + 1, d)
  assert _feature_shapes(m, size) == want


@pytest.mark.parametrize("preset,size", [("det", 1024), ("seg", 512)])
def test_base_output_shapes_equal_official(preset, size):
  official = _facts()[preset]["outputs"]                # NCHW
  shapes = _feature_shapes(_abstract(f"convvit_{preset}_base"), size)
  got = [(s[0], s[3], s[1], s[2]) for s in (shapes[k] for k in
                                             ("stride4", "stride8", "stride16", "stride32"))]
  assert got == [tuple(v) for v in official.values()]


def test_which_blocks_are_global():
  det, seg, vit = (_abstract(f"convvit_{p}_base") for p in PRESETS)
  assert det.global_block_indices() == (0, 3, 6, 10)
  assert seg.global_block_indices() == tuple(range(11))
  assert vit.global_block_indices() == (1, 4, 7, 10)
  assert {b.window_size for i, b in enumerate(det.blocks3) if i not in (0, 3, 6, 10)} == {16}
  assert {b.window_size for i, b in enumerate(vit.blocks3) if i not in (1, 4, 7, 10)} == {14}
  # another layout from the config fields alone
  seed = _abstract("convvit_vitdet_base", global_blocks=(0, 3, 6, 10), window_size=8)
  assert seed.global_block_indices() == (0, 3, 6, 10)
  assert seed.blocks3[1].attn.rel_pos_h.shape == (15, 64)         # 2·8 − 1 rows, head_dim 64
  assert seed.blocks3[0].attn.rel_pos_h.shape == (127, 64)        # the 64x64 grid
  # smaller depths keep the official indices that exist: tiny (2 blocks) has one of each kind
  assert _abstract("convvit_det_tiny").global_block_indices() == (0,)
  assert _abstract("convvit_vitdet_tiny").global_block_indices() == (1,)


def test_param_counts_equal_official():
  facts = _facts()
  det = _abstract("convvit_det_base")
  assert models.count_params(det) + models.count_params(det, models.FrozenPosEmbed) == \
      facts["det"]["num_params"]
  assert models.count_params(_abstract("convvit_seg_base")) == facts["seg"]["num_params"]


# ------------------------------------------------------------------------------------------------
# relative positions and windows


@pytest.mark.parametrize("grid", [(3, 4), (16, 16), (5, 2)])
def test_relative_position_index_closed_form(grid):
  gh, gw = grid
  idx = models.relative_position_index(grid)
  ref = np.zeros((gh * gw, gh * gw), np.int64)
  for y1 in range(gh):
    for x1 in range(gw):
      for y2 in range(gh):
        for x2 in range(gw):
          ref[y1 * gw + x1, y2 * gw + x2] = (y1 - y2 + gh - 1) * (2 * gw - 1) + (x1 - x2 + gw - 1)
  np.testing.assert_array_equal(idx, ref)
  # the JAX bias (two 1-D gathers) is the table gathered at that index, as PyTorch does it
  table = np.random.default_rng(0).standard_normal(((2 * gh - 1) * (2 * gw - 1), 3)).astype(np.float32)
  want = table[idx.reshape(-1)].reshape(gh * gw, gh * gw, 3).transpose(2, 0, 1)
  np.testing.assert_array_equal(np.asarray(transformer.table_bias(jnp.asarray(table), grid)), want)
  # and equals the twin's buffer
  np.testing.assert_array_equal(tb._beit_index(grid).numpy(), ref)


@pytest.mark.parametrize("rel_pos", ["none", "table", "decomposed"])
def test_one_window_covering_grid_equals_global(rel_pos):
  g, d = 6, 32
  rp_grid = (g, g) if rel_pos != "none" else None

  def block(window):
    return transformer.Block(d, 4, 4.0, kernel_init=lambda i, o: layers.normal(0.02), window_size=window,
                        rel_pos=rel_pos, rel_pos_grid=rp_grid, rngs=nnx.Rngs(0))

  win, glob = block(g), block(0)
  _randomize(glob, 1)
  nnx.update(win, nnx.state(glob))
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, g * g, d)).astype(np.float32))
  bias = jnp.asarray(np.random.default_rng(3).standard_normal((4, g * g, g * g)).astype(np.float32))
  a = win(x, grid=(g, g), bias=bias)
  b = glob(x, grid=(g, g), bias=bias)
  assert float(jnp.max(jnp.abs(a - b))) <= 1e-6
  assert float(jnp.max(jnp.abs(a - x))) > 1e-2                     # the block did something


def test_interpolated_pos_embed_equals_torch_bicubic():
  m = models.create("convvit_vitdet_tiny", rngs=nnx.Rngs(0), img_size=512)
  pos = np.random.default_rng(0).standard_normal((1, 196, 64)).astype(np.float32)
  m.pos_embed[...] = jnp.asarray(pos)
  got = np.asarray(m._pos_embed(32, jnp.float32))
  t = torch.from_numpy(pos).double().reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(t, size=(32, 32), mode="bicubic", align_corners=False)
  ref = ref.permute(0, 2, 3, 1).reshape(1, 1024, 64).numpy()
  assert got.shape == (1, 1024, 64)
  assert np.max(np.abs(got - ref)) <= 1e-5
  assert np.max(np.abs(resize_pos_embed(pos, 32, 14) - ref)) <= 1e-5  # load-time resize, same op


# ------------------------------------------------------------------------------------------------
# official keys, round trips


@pytest.mark.parametrize("preset", ["det", "seg"])
def test_exported_keys_and_shapes_equal_official(preset):
  want = {k: tuple(v) for k, v in _facts()[preset]["state_dict"].items()}
  m = _abstract(f"convvit_{preset}_base")
  assert ib.backbone_state_dict_shapes(m) == want
  prefix = {"det": "backbone.bottom_up.", "seg": "backbone."}[preset]
  assert ib.backbone_state_dict_shapes(m, "codebase") == {prefix + k: v for k, v in want.items()}


@pytest.mark.parametrize("preset", PRESETS)
def test_export_import_bit_exact(preset):
  src = models.create(f"convvit_{preset}_tiny", rngs=nnx.Rngs(0), img_size=256)
  _randomize(src, 0)
  sd = ib.to_backbone_state_dict(src, prefix="codebase")
  dst = models.create(f"convvit_{preset}_tiny", rngs=nnx.Rngs(1), img_size=256)
  # a whole detector checkpoint: the neck's keys are ignored
  report = ib.load_backbone_state_dict(dst, {"model": {**sd, "neck.conv.weight": np.zeros(3)}})
  assert report.prefix == ib.codebase_prefix(src.config) and report.ignored == ["neck.conv.weight"]
  filt = nnx.Any(nnx.Param, models.FrozenPosEmbed, nnx.BatchStat)
  a, b = nnx.to_flat_state(nnx.state(src, filt)), nnx.to_flat_state(nnx.state(dst, filt))
  assert [p for p, _ in a] == [p for p, _ in b]
  for (path, va), (_, vb) in zip(a, b):
    np.testing.assert_array_equal(np.asarray(va[...]), np.asarray(vb[...]), err_msg=str(path))
  again = ib.to_backbone_state_dict(dst, prefix="codebase")
  assert all(np.array_equal(sd[k], again[k]) and sd[k].dtype == again[k].dtype for k in sd)


def test_saved_files_load_back(tmp_path):
  src = models.create("convvit_seg_tiny", rngs=nnx.Rngs(0), img_size=64)
  _randomize(src, 0)
  sd = ib.save_backbone(src, str(tmp_path / "seg.pth"), prefix="codebase", wrapper="state_dict")
  ib.save_backbone(src, str(tmp_path / "seg.safetensors"))
  loaded = torch.load(str(tmp_path / "seg.pth"), map_location="cpu", weights_only=True)
  assert sorted(loaded) == ["state_dict"] and sorted(loaded["state_dict"]) == sorted(sd)
  from safetensors.numpy import load_file
  for source in (loaded, load_file(str(tmp_path / "seg.safetensors"))):
    dst = models.create("convvit_seg_tiny", rngs=nnx.Rngs(1), img_size=64)
    ib.load_backbone_state_dict(dst, source)
    back = ib.to_backbone_state_dict(dst, prefix="codebase")
    assert all(np.array_equal(sd[k], back[k]) for k in sd)


@pytest.mark.parametrize("preset", PRESETS)
def test_features_equal_pytorch_twin(preset):
  """JAX features vs the independent PyTorch twin with the same (exported) weights, float32, at
  512 px: det has four 16x16 windows, vitdet pads the 32x32 grid to 42x42 for 14x14 windows."""
  name = f"convvit_{preset}_tiny"
  m = models.create(name, rngs=nnx.Rngs(0), img_size=512)
  _randomize(m, 0)
  m.eval()
  twin = tb.torch_backbone(name, img_size=512)
  twin.load_state_dict({k: torch.from_numpy(v) for k, v in ib.to_backbone_state_dict(m).items()},
                       strict=True)
  twin.eval()
  x = np.random.default_rng(1).standard_normal((1, 512, 512, 3)).astype(np.float32)
  out = _jit_features(m)(jnp.asarray(x))
  with torch.no_grad():
    ref = twin(torch.from_numpy(x).permute(0, 3, 1, 2))
  assert sorted(out) == sorted(ref)
  for k in out:
    diff = float(np.max(np.abs(np.asarray(out[k]) - ref[k].permute(0, 2, 3, 1).numpy())))
    print(f"parity {preset} {k}: max abs diff {diff:.2e}")
    assert diff <= PARITY_ATOL, (k, diff)


def test_lean_softmax_same_values_and_gradients():
  """The backbone's softmax keeps only its output for the backward pass: forward bit-identical to
  jax.nn.softmax, gradients equal to float32 rounding."""
  x = jnp.asarray(4 * np.random.default_rng(0).standard_normal((2, 3, 50, 50)).astype(np.float32))
  g = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 50, 50)).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(transformer.softmax_keep_output(x)),
                                np.asarray(jax.nn.softmax(x, axis=-1)))
  lean = jax.grad(lambda x: jnp.sum(transformer.softmax_keep_output(x) * g))(x)
  ref = jax.grad(lambda x: jnp.sum(jax.nn.softmax(x, axis=-1) * g))(x)
  assert float(jnp.max(jnp.abs(lean - ref))) <= 1e-6


def test_remat_and_bfloat16():
  """remat=True gives the same loss and gradients; bfloat16 compute stays near float32."""
  kw = dict(img_size=64, window_size=2, drop_path_rate=0.0)     # 4x4 grid, 2x2 windows
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype(np.float32))
  outs, kept = {}, {}
  for remat in (False, True):
    m = models.create("convvit_vitdet_tiny", rngs=nnx.Rngs(0), remat=remat, **kw)
    _randomize(m, 0)
    gd, params, rest = nnx.split(m, nnx.Param, ...)
    loss = lambda p, rest: jnp.sum(nnx.merge(gd, p, rest).features(x)["stride16"] ** 2)
    outs[remat] = jax.jit(jax.value_and_grad(loss))(params, rest)
    # What the backward pass keeps (the residuals the VJP closes over, beyond the parameters):
    # with remat, every block of every stage keeps only its input.
    f = lambda p: sum(jnp.sum(v) for v in nnx.merge(gd, p, rest).features(x).values())
    vjp = jax.jit(lambda p: jax.vjp(f, p)[1])(params)   # one compilation, not op by op
    kept[remat] = (sum(a.nbytes for a in jax.tree.leaves(vjp))
                   - sum(a.nbytes for a in jax.tree.leaves(params)))
  (l0, g0), (l1, g1) = outs[False], outs[True]
  assert abs(float(l0) - float(l1)) <= 1e-6 * abs(float(l0))
  assert max(float(jnp.max(jnp.abs(a - b)))
             for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1))) <= 1e-5
  # (342 kB against 1.6 MB; before the depthwise conv's written-out backward, which keeps its
  # input instead of 25 shifted slices, the dense side kept 2.7 MB.)
  assert 0 < kept[True] < 0.25 * kept[False], kept
  feats = {}
  for dtype in ("float32", "bfloat16"):
    m = models.create("convvit_vitdet_tiny", rngs=nnx.Rngs(0), dtype=dtype, **kw)
    _randomize(m, 0)
    feats[dtype] = _jit_features(m)(x)["stride16"]
  assert feats["bfloat16"].dtype == jnp.bfloat16
  ref = feats["float32"]
  rel = float(jnp.linalg.norm(feats["bfloat16"].astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
  assert rel < 0.05


# ------------------------------------------------------------------------------------------------
# pretrained checkpoints


def test_init_from_pretraining_checkpoint(tmp_path):
  mae = models.create("convmae_tiny", rngs=nnx.Rngs(0), img_size=224)
  _randomize(mae, 3)
  from convmae_jax.interop import convert
  sd = convert.to_torch_state_dict(mae)                   # official pretraining layout, 14x14
  path = str(tmp_path / "convmae_tiny.pth")               # an official-style .pth file
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 1}, path)
  for preset, grid in (("det", 32), ("seg", 32), ("vitdet", 14)):
    bb = models.create(f"convvit_{preset}_tiny", rngs=nnx.Rngs(0), img_size=512)
    rep = weights.init_backbone(bb, path if preset == "det" else {"model": sd})
    assert rep["ignored"] == sum(k.startswith(convert.PRETRAIN_ONLY_PREFIXES) for k in sd)
    np.testing.assert_array_equal(np.asarray(bb.blocks3[1].attn.qkv.kernel[...]),
                                  np.asarray(mae.blocks3[1].attn.qkv.kernel[...]))
    np.testing.assert_array_equal(np.asarray(bb.blocks1[0].attn.kernel[...]),
                                  np.asarray(mae.blocks1[0].attn.kernel[...]))
    want = resize_pos_embed(sd["pos_embed"], grid, 14)
    np.testing.assert_array_equal(np.asarray(bb.pos_embed[...]), want)
    for k in rep["kept_initial"]:                          # only backbone-only keys stay fresh
      assert weights._backbone_only(k), k
    tables = [v for p, v in nnx.to_flat_state(nnx.state(bb, nnx.Param))
              if p[-1] in ("relative_position_bias_table", "rel_pos_h", "rel_pos_w")]
    assert tables and all(float(jnp.max(jnp.abs(v[...]))) == 0.0 for v in tables)


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_image_size_names_nearest_accepted():
  with pytest.raises(ValueError, match=r"nearest accepted img_size: \[1024, 1280\]"):
    models.create("convvit_det_tiny", rngs=nnx.Rngs(0), img_size=1040)   # 65 tokens, 16 windows
  with pytest.raises(ValueError, match=r"nearest accepted: \[1024, 1040\]"):
    models.create("convvit_det_tiny", rngs=nnx.Rngs(0), img_size=1030)   # not a multiple of 16
  assert models.config_for("convvit_vitdet_tiny", img_size=1040).grid_sizes[2] == 65  # padded
  m = models.create("convvit_seg_tiny", rngs=nnx.Rngs(0), img_size=64)
  with pytest.raises(ValueError, match=r"built for 64x64 images .* got 96x96"):
    m.features(jnp.zeros((1, 96, 96, 3)))


def test_global_block_out_of_range():
  with pytest.raises(ValueError, match=r"index 11 is out of range for 11 stage-3 blocks; accepted: 0\.\.10"):
    models.config_for("convvit_det_base", global_blocks=(0, 3, 11))


def test_checkpoint_that_does_not_fit_names_keys():
  small = models.create("convvit_det_tiny", rngs=nnx.Rngs(0), img_size=256)
  other = models.create("convvit_det_tiny", rngs=nnx.Rngs(0), img_size=256,
                        embed_dims=(32, 48, 96))
  before = ib.to_backbone_state_dict(small)
  with pytest.raises(ValueError, match=r"shapes that do not fit: pos_embed: checkpoint \(1, 256, 96\), "
                                       r"model \(1, 256, 64\), patch_embed3"):
    ib.load_backbone_state_dict(small, ib.to_backbone_state_dict(other))
  with pytest.raises(ValueError, match=r"pos_embed: checkpoint \(1, 256, 96\), model \(1, 256, 64\), "
                                       r"patch_embed3\.proj\.weight"):
    weights.init_backbone(small, ib.to_backbone_state_dict(other))
  after = ib.to_backbone_state_dict(small)
  assert all(np.array_equal(before[k], after[k]) for k in before)     # nothing changed
  sd = dict(before)
  sd["windowed_rel_pos_bias.relative_position_index"] = sd[
      "windowed_rel_pos_bias.relative_position_index"][::-1].copy()
  with pytest.raises(ValueError, match="not the relative position index of a 16x16 grid"):
    ib.load_backbone_state_dict(small, sd)
