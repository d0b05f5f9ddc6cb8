"""Semantic segmentation: the UperNet segmentor against its PyTorch twin (logits, loss, gradients,
BatchNorm statistics), the mmseg state-dict layout, resampling against PyTorch, mIoU/mAcc/aAcc
against a numpy reference, sliding-window inference, the layer-decay table of spec §5.2.

CPU, tiny backbones (convvit_seg_tiny) and heads (16-32 channels), images of 64-128 px.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from flax import nnx  # noqa: E402

from convmae_jax import models  # noqa: E402
from convmae_jax.interop import segmentor as iseg  # noqa: E402
from convmae_jax.interop import torch_segmentor as tseg  # noqa: E402
from convmae_jax.models import upernet  # noqa: E402

PARITY_ATOL = 1e-5
SIZE = 128                         # stage-3 grid 8, stride-32 map 3x3 (unpadded conv)
HEAD = {"num_classes": 7, "channels": 24, "aux_channels": 16}


def _randomize(model, seed):
  """Every float variable set to N(0, 0.1²) values (BN running variances positive), so nothing is
  tested at its zero / one initial value."""
  state = nnx.state(model, nnx.Any(nnx.Param, models.FrozenPosEmbed, nnx.BatchStat))
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(state):
    v = var[...]
    if jnp.issubdtype(v.dtype, jnp.integer):
      var[...] = jnp.full(v.shape, 3, v.dtype)
      continue
    a = 0.1 * rng.standard_normal(v.shape).astype(np.float32)
    if path[-1] == "running_var":
      a = np.abs(a) + 0.5
    var[...] = jnp.asarray(a)
  nnx.update(model, state)


def _pair(head=HEAD, seed=0, **overrides):
  kw = dict(img_size=SIZE, drop_path_rate=0.0, **overrides)
  seg = models.create_segmentor("convvit_seg_tiny", rngs=nnx.Rngs(seed), head=head, **kw)
  _randomize(seg, seed)
  twin = tseg.torch_segmentor("convvit_seg_tiny", head=head, **kw)
  twin.load_state_dict({k: torch.from_numpy(v) for k, v in iseg.to_segmentor_state_dict(seg).items()},
                       strict=True)
  return seg, twin


def _inputs(n=2, seed=1, size=SIZE, num_classes=HEAD["num_classes"]):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, size, size, 3)).astype(np.float32)
  y = rng.integers(0, num_classes, (n, size, size)).astype(np.int32)
  y[:, :size // 4] = upernet.IGNORE_INDEX                     # a quarter of the rows ignored
  return x, y


# ------------------------------------------------------------------------------------------------
# Resampling
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("src,dst", [((3, 3), (8, 8)), ((15, 15), (32, 32)), ((4, 6), (16, 17)),
                                     ((32, 32), (128, 128)), ((37, 20), (11, 9))])
def test_bilinear_resize_equals_torch(src, dst):
  x = np.random.default_rng(0).standard_normal((2,) + src + (5,)).astype(np.float32)
  out = np.asarray(upernet.resize_bilinear(jnp.asarray(x), dst))
  ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=dst,
                                        mode="bilinear", align_corners=False)
  diff = np.max(np.abs(out - ref.permute(0, 2, 3, 1).numpy()))
  assert out.shape == (2,) + dst + (5,) and diff <= 2e-6, diff   # a few float32 ulps


@pytest.mark.parametrize("src,scale", [(3, 2), (3, 6), (15, 6), (8, 3), (1, 3), (7, 1)])
def test_adaptive_avg_pool_equals_torch(src, scale):
  x = np.random.default_rng(0).standard_normal((2, src, src, 4)).astype(np.float32)
  out = np.asarray(upernet.adaptive_avg_pool(jnp.asarray(x), scale))
  ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), scale)
  assert np.max(np.abs(out - ref.permute(0, 2, 3, 1).numpy())) <= 1e-6


# ------------------------------------------------------------------------------------------------
# The segmentor against its PyTorch twin
# ------------------------------------------------------------------------------------------------
def test_state_dict_keys_follow_mmseg_layout():
  seg = models.create_segmentor("convvit_seg_tiny", rngs=nnx.Rngs(0), head=HEAD, img_size=SIZE)
  sd = iseg.to_segmentor_state_dict(seg)
  c = HEAD["channels"]
  expect = {
      "decode_head.psp_modules.0.1.conv.weight": (c, 64, 1, 1),
      "decode_head.psp_modules.3.1.bn.running_var": (c,),
      "decode_head.bottleneck.conv.weight": (c, 64 + 4 * c, 3, 3),
      "decode_head.lateral_convs.0.conv.weight": (c, 32, 1, 1),
      "decode_head.lateral_convs.2.bn.weight": (c,),
      "decode_head.fpn_convs.1.conv.weight": (c, c, 3, 3),
      "decode_head.fpn_bottleneck.conv.weight": (c, 4 * c, 3, 3),
      "decode_head.conv_seg.weight": (7, c, 1, 1), "decode_head.conv_seg.bias": (7,),
      "auxiliary_head.convs.0.conv.weight": (16, 64, 3, 3),
      "auxiliary_head.convs.0.bn.num_batches_tracked": (),
      "auxiliary_head.conv_seg.weight": (7, 16, 1, 1),
      "backbone.fpn.0.weight": (64, 64, 3, 3),
  }
  for k, shape in expect.items():
    assert tuple(sd[k].shape) == shape, k
  head_keys = [k for k in sd if not k.startswith("backbone.")]
  # 4 PPM + bottleneck + 3 lateral + 3 fpn + fpn_bottleneck = 12 ConvModules x 6 tensors, 2 conv_seg;
  # aux: 1 ConvModule + conv_seg.
  assert len(head_keys) == 12 * 6 + 2 + 6 + 2
  assert not any(k.endswith("conv.bias") for k in sd if "head" in k)   # ConvModule convs: no bias
  # Round trip into a fresh model, bit-exact.
  dst = models.create_segmentor("convvit_seg_tiny", rngs=nnx.Rngs(5), head=HEAD, img_size=SIZE)
  iseg.load_segmentor_state_dict(dst, sd)
  back = iseg.to_segmentor_state_dict(dst)
  assert sorted(back) == sorted(sd) and all(np.array_equal(sd[k], back[k]) for k in sd)
  with pytest.raises(ValueError, match="decode_head.conv_seg.weight"):
    iseg.load_segmentor_state_dict(dst, {**sd, "decode_head.conv_seg.weight": np.zeros((3, c, 1, 1))})


@pytest.mark.parametrize("k,cin,cout", [(1, 5, 4), (3, 5, 4), (3, 4, 6)])
def test_convs_as_matmuls_equal_the_convolution(k, cin, cout):
  """The heads' CPU form of a "same" k x k conv (k² shifted matmuls, products first when the conv
  narrows the channels; its written-out backward) against lax's convolution: outputs and both
  gradients (the parity tests below run the matmul form, "auto" on CPU)."""
  rng = np.random.default_rng(k + cout)
  x = jnp.asarray(rng.standard_normal((2, 9, 7, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
  t = jnp.asarray(rng.standard_normal((2, 9, 7, cout)), jnp.float32)
  lax_conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), [(k // 2, k // 2)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  outs = {}
  for name, f in (("matmul", upernet.conv_as_matmuls), ("lax", lax_conv)):
    outs[name] = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(f(x, w) * t), argnums=(0, 1)))(x, w)
    assert f(x, w).shape == (2, 9, 7, cout)
  np.testing.assert_allclose(outs["matmul"][0], outs["lax"][0], rtol=1e-5)
  for a, b in zip(outs["matmul"][1], outs["lax"][1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert upernet.resolve_conv_impl("auto") == "matmul"         # the suite runs on CPU
  with pytest.raises(ValueError, match="conv_impl='cudnn' is not accepted"):
    upernet.HeadConfig(conv_impl="cudnn").validate()


def test_eval_logits_equal_pytorch_twin():
  """Eval mode (BN running statistics, no dropout): decode logits at the input size and both
  heads' own logits within 1e-5 of the twin's, float32, same weights."""
  seg, twin = _pair()
  seg.eval()
  twin.eval()
  x, _ = _inputs()
  logits, (decode, aux) = nnx.jit(lambda m, v: (m(v), m.head_logits(v)))(seg, jnp.asarray(x))
  with torch.no_grad():
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    ref = twin(xt).permute(0, 2, 3, 1).numpy()
    ref_dec, ref_aux = (t.permute(0, 2, 3, 1).numpy() for t in twin.head_logits(xt))
  assert logits.shape == (2, SIZE, SIZE, 7) and decode.shape == (2, SIZE // 4, SIZE // 4, 7)
  assert aux.shape == (2, SIZE // 16, SIZE // 16, 7)
  diffs = [float(np.max(np.abs(np.asarray(a) - b)))
           for a, b in ((logits, ref), (decode, ref_dec), (aux, ref_aux))]
  print(f"segmentor parity (eval): logits {diffs[0]:.2e} decode {diffs[1]:.2e} aux {diffs[2]:.2e}")
  assert max(diffs) <= PARITY_ATOL, diffs
  assert float(np.std(ref)) > 1e-2                       # the logits are not trivially equal


def test_train_loss_gradients_and_bn_statistics_equal_pytorch_twin():
  """Train mode (batch statistics; dropout 0 so both sides are deterministic): the total loss,
  both parts (each reduction: over all pixels, and avg_non_ignore), the gradients and the updated
  BN running statistics equal the twin's."""
  head = {**HEAD, "dropout": 0.0}
  seg, twin = _pair(head=head)
  twin.train()
  x, y = _inputs()
  graphdef, params, rest = nnx.split(seg, nnx.Param, ...)

  def loss_fn(p, r):
    model = nnx.merge(graphdef, p, r, copy=True)
    loss, scalars = model.loss(jnp.asarray(x), jnp.asarray(y))
    stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))   # after exactly one forward
    # The other reduction from a second forward (same batch statistics, so the same logits).
    decode, _ = model.head_logits(jnp.asarray(x))
    scalars["decode_non_ignore"] = upernet.segmentation_cross_entropy(
        upernet.resize_bilinear(decode, y.shape[1:]), jnp.asarray(y), avg_non_ignore=True)
    return loss, (scalars, stats)

  (loss, (scalars, stats)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, rest)
  xt, yt = torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y).long()
  decode_t, aux_t = twin.head_logits(xt)                   # one train-mode forward
  size = y.shape[1:]
  ref_parts = {"decode_loss": tseg.cross_entropy(tseg._resize(decode_t, size), yt),
               "aux_loss": tseg.cross_entropy(tseg._resize(aux_t, size), yt),
               "decode_non_ignore": tseg.cross_entropy(tseg._resize(decode_t, size), yt,
                                                       avg_non_ignore=True)}
  ref_loss_t = ref_parts["decode_loss"] + 0.4 * ref_parts["aux_loss"]
  ref_loss_t.backward()
  ref_loss = float(ref_loss_t.detach())
  print(f"loss {float(loss):.6f} vs torch {ref_loss:.6f}")
  assert abs(float(loss) - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
  for k in ("decode_loss", "aux_loss", "decode_non_ignore"):
    assert abs(float(scalars[k]) - float(ref_parts[k].detach())) <= 1e-5, k
  assert float(scalars["decode_non_ignore"]) > float(scalars["decode_loss"])   # 1/4 of pixels ignored
  named = dict(twin.named_parameters())
  flat_grads = nnx.to_pure_dict(grads)
  for path, key, transpose in (
      (("decode_head", "conv_seg", "kernel"), "decode_head.conv_seg.weight", (2, 3, 1, 0)),
      (("decode_head", "psp_modules", 1, "conv", "kernel"), "decode_head.psp_modules.1.1.conv.weight",
       (2, 3, 1, 0)),
      (("auxiliary_head", "convs", 0, "bn", "scale"), "auxiliary_head.convs.0.bn.weight", None),
      (("backbone", "blocks3", 1, "attn", "relative_position_bias_table"),
       "backbone.blocks3.1.attn.relative_position_bias_table", None)):
    g = np.asarray(_get(flat_grads, path))
    ref = named[key].grad.numpy()
    ref = ref.transpose(*transpose) if transpose else ref
    scale = float(np.max(np.abs(ref)))
    assert scale > 0 and float(np.max(np.abs(g - ref))) <= 1e-4 * max(scale, 1e-2), key
  buffers = dict(twin.named_buffers())
  got = stats
  for path, key in ((("decode_head", "fpn_bottleneck", "bn", "running_mean"),
                     "decode_head.fpn_bottleneck.bn.running_mean"),
                    (("auxiliary_head", "convs", 0, "bn", "running_var"),
                     "auxiliary_head.convs.0.bn.running_var")):
    new = np.asarray(_get(got, path))
    old = np.asarray(_get(nnx.to_pure_dict(nnx.state(seg, nnx.BatchStat)), path))
    assert np.max(np.abs(new - buffers[key].numpy())) <= 1e-5, key
    assert np.max(np.abs(new - old)) > 1e-4, key             # the statistics did move


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def test_loss_ignores_label_255_and_averages_as_mmseg():
  """CE of hand-made logits: ignored pixels add nothing; the mean is over all pixels (mmseg 0.11)
  or the labelled ones (avg_non_ignore)."""
  logits = np.log(np.array([[[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]], np.float32))   # (1, 1, 2, 3)
  labels = np.array([[[0, 255]]], np.int32)
  all_px = upernet.segmentation_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  labelled = upernet.segmentation_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                                avg_non_ignore=True)
  assert abs(float(all_px) - np.log(2) / 2) <= 1e-6
  assert abs(float(labelled) - np.log(2)) <= 1e-6


def test_backbone_without_stride32_is_refused():
  with pytest.raises(ValueError, match="out_stride32='none'"):
    models.create_segmentor("convvit_vitdet_tiny", rngs=nnx.Rngs(0), head=HEAD, img_size=SIZE)
  with pytest.raises(ValueError, match="collides with the ignore index"):
    models.create_segmentor("convvit_seg_tiny", rngs=nnx.Rngs(0), head={"num_classes": 300},
                            img_size=SIZE)


# ------------------------------------------------------------------------------------------------
# Metrics: mIoU / mAcc / aAcc against a numpy reference written as mmseg's per-image areas
# ------------------------------------------------------------------------------------------------
from convmae_jax.train import optim  # noqa: E402
from convmae_jax.train.evaluators import segmentation as seg_eval  # noqa: E402


def _mmseg_reference(preds, labels, num_classes, ignore_index=255):
  """mmseg's intersect_and_union per image (histograms of the labelled pixels), areas summed, then
  IoU = I / U, Acc = I / label area, nan-means, aAcc."""
  inter = np.zeros(num_classes)
  union = np.zeros(num_classes)
  area_pred = np.zeros(num_classes)
  area_label = np.zeros(num_classes)
  for pred, label in zip(preds, labels):
    mask = label != ignore_index
    p, lab = pred[mask], label[mask]
    i = p[p == lab]
    a_i = np.histogram(i, bins=num_classes, range=(0, num_classes - 1))[0]
    a_p = np.histogram(p, bins=num_classes, range=(0, num_classes - 1))[0]
    a_l = np.histogram(lab, bins=num_classes, range=(0, num_classes - 1))[0]
    inter += a_i
    area_pred += a_p
    area_label += a_l
    union += a_p + a_l - a_i
  with np.errstate(divide="ignore", invalid="ignore"):
    iou, acc = inter / union, inter / area_label
  return 100 * np.nanmean(iou), 100 * np.nanmean(acc), 100 * inter.sum() / area_label.sum(), iou, acc


def test_scores_equal_numpy_reference_with_ignore_and_absent_classes():
  rng = np.random.default_rng(0)
  k = 9
  labels = rng.integers(0, 7, (4, 20, 30))                   # classes 7, 8 never labelled
  labels[rng.random(labels.shape) < 0.2] = 255               # 20 % ignored
  preds = np.where(rng.random(labels.shape) < 0.6, labels, rng.integers(0, 8, labels.shape))
  preds = np.where(preds == 255, 3, preds)                   # class 8 never predicted either
  cm = sum(np.asarray(seg_eval.confusion_matrix(jnp.asarray(p), jnp.asarray(lab), k), np.int64)
           for p, lab in zip(preds, labels))
  scores = seg_eval.segmentation_scores(cm)
  miou, macc, aacc, iou, acc = _mmseg_reference(preds, labels, k)
  assert cm.sum() == int(np.sum(labels != 255))
  assert abs(scores["mIoU"] - miou) <= 1e-9 and abs(scores["mAcc"] - macc) <= 1e-9
  assert abs(scores["aAcc"] - aacc) <= 1e-9
  assert np.isnan(scores["per_class"]["8"]["IoU"]) and np.isnan(iou[8])       # absent: NaN
  assert scores["per_class"]["7"]["IoU"] == 0.0 and np.isnan(scores["per_class"]["7"]["Acc"])
  per_class = np.array([scores["per_class"][str(c)]["IoU"] for c in range(k)])
  np.testing.assert_allclose(per_class, 100 * iou, rtol=0, atol=1e-9)
  assert 20.0 < scores["mIoU"] < 80.0                        # neither trivial extreme


# ------------------------------------------------------------------------------------------------
# Sliding-window inference
# ------------------------------------------------------------------------------------------------
def _window_model(crops):
  """A stand-in model whose output depends on the whole window (its mean), so overlaps matter."""
  return 2.0 * crops[..., :4] + jnp.mean(crops, axis=(1, 2), keepdims=True)[..., :1]


def _mmseg_slide_reference(fn, image, crop, stride, k):
  """mmseg's slide_inference on one (h, w, C) image, literally."""
  h, w = image.shape[:2]
  (ch, cw), (sh, sw) = crop, stride
  preds = np.zeros((h, w, k))
  count = np.zeros((h, w, 1))
  for i in range(max(h - ch + sh - 1, 0) // sh + 1):
    for j in range(max(w - cw + sw - 1, 0) // sw + 1):
      y1, x1 = i * sh, j * sw
      y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
      y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
      preds[y1:y2, x1:x2] += np.asarray(fn(jnp.asarray(image[None, y1:y2, x1:x2])))[0]
      count[y1:y2, x1:x2] += 1
  return preds / count


def test_slide_equals_mmseg_windows_on_a_padded_canvas():
  """Three images of different sizes padded into one 40x56 canvas: each image's averaged logits
  equal mmseg's windows over that image alone (crop 16, stride 11: overlaps and moved-back last
  windows); the padding stays 0."""
  rng = np.random.default_rng(0)
  canvas = np.zeros((3, 40, 56, 4), np.float32)
  sizes = [(40, 56), (27, 33), (16, 50)]
  for n, (h, w) in enumerate(sizes):
    canvas[n, :h, :w] = rng.standard_normal((h, w, 4))
  out = np.asarray(jax.jit(lambda x, v: seg_eval.slide_logits(
      _window_model, x, crop=(16, 16), stride=(11, 11), num_classes=4, valid_hw=v))(
          jnp.asarray(canvas), jnp.asarray(sizes, jnp.int32)))
  for n, (h, w) in enumerate(sizes):
    ref = _mmseg_slide_reference(_window_model, canvas[n, :h, :w], (16, 16), (11, 11), 4)
    assert np.max(np.abs(out[n, :h, :w] - ref)) <= 1e-5, n
    assert np.all(out[n, h:] == 0) and np.all(out[n, :, w:] == 0)


def test_slide_equals_whole_image_when_the_crop_covers_it():
  """The tiny segmentor (eval mode) on 64x64 images: slide with crop 64 (stride 43) is the
  whole-image logits, exactly; with a smaller crop it is not."""
  seg = models.create_segmentor("convvit_seg_tiny", rngs=nnx.Rngs(0), head=HEAD, img_size=64)
  _randomize(seg, 0)
  seg.eval()
  x, _ = _inputs(n=2, size=64)
  graphdef, state = nnx.split(seg)

  @jax.jit
  def both(state, x):
    model = nnx.merge(graphdef, state)
    whole = model(x)
    slide = seg_eval.slide_logits(model, x, crop=(64, 64), stride=(43, 43), num_classes=7)
    return whole, slide

  whole, slide = both(state, jnp.asarray(x))
  assert whole.shape == (2, 64, 64, 7)
  assert float(jnp.max(jnp.abs(whole - slide))) == 0.0
  assert float(jnp.std(whole)) > 1e-2


# ------------------------------------------------------------------------------------------------
# Layer decay and weight decay of spec §5.2
# ------------------------------------------------------------------------------------------------
def test_layer_decay_scales_equal_spec_table():
  """ConvMAE-Base UperNet (abstract): 0.75^(12 − id), id 0 for patch_embed*/blocks1/blocks2/
  pos_embed, blocks3.i -> i + 1, the rest (fpn, heads) -> 12; weight decay on every >= 2-D
  parameter, pos_embed and the relative-position tables included."""
  abstract = nnx.eval_shape(lambda: models.create_segmentor("convvit_seg_base", rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  scales = nnx.to_pure_dict(optim.segmentation_lr_scales(params, 0.75))
  mask = nnx.to_pure_dict(optim.segmentation_decay_mask(params))
  bb = scales["backbone"]
  table = {
      0.75 ** 12: [bb["patch_embed1"]["proj"]["kernel"], bb["patch_embed4"]["kernel"],
                   bb["pos_embed"], bb["blocks1"][0]["attn"]["kernel"],
                   bb["blocks2"][1]["norm1"]["scale"]],
      0.75 ** 11: [bb["blocks3"][0]["attn"]["qkv"]["kernel"]],
      0.75 ** 6: [bb["blocks3"][5]["gamma_1"]],
      0.75 ** 1: [bb["blocks3"][10]["attn"]["relative_position_bias_table"]],
      1.0: [bb["fpn"][0]["kernel"], bb["fpn"][1]["scale"], scales["decode_head"]["conv_seg"]["kernel"],
            scales["auxiliary_head"]["convs"][0]["conv"]["kernel"]],
  }
  for want, got in table.items():
    assert all(abs(g - want) <= 1e-12 for g in got), (want, got)
  distinct = sorted({round(v, 12) for v in jax.tree.leaves(scales)})
  assert distinct == sorted(round(0.75 ** (12 - i), 12) for i in range(13))   # ids 0..12 all used
  mb = mask["backbone"]
  assert mb["pos_embed"] and mb["blocks3"][3]["attn"]["relative_position_bias_table"]
  assert mb["blocks3"][3]["attn"]["qkv"]["kernel"] and mask["decode_head"]["bottleneck"]["conv"]["kernel"]
  assert not mb["blocks3"][3]["attn"]["qkv"]["bias"] and not mb["blocks3"][3]["gamma_1"]
  assert not mask["decode_head"]["bottleneck"]["bn"]["scale"] and not mb["fpn"][0]["bias"]


def test_poly_schedule_with_linear_warmup_equals_mmcv_formula():
  s = optim.WarmupPoly(peak_lr=1e-4, warmup_steps=1500, total_steps=160_000)
  for t in (0, 1, 750, 1499, 1500, 80_000, 159_999, 160_000):
    poly = 1e-4 * (1 - t / 160_000)
    want = poly * (1 - (1 - t / 1500) * (1 - 1e-6)) if t < 1500 else poly
    assert abs(float(s(t)) - want) <= 1e-6 * 1e-4 + 1e-7 * want, t
  assert abs(float(s(0)) - 1e-10) <= 1e-15                 # warmup starts at ratio 1e-6 · peak
