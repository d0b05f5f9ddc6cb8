"""convmae_jax/data/augment.py against timm 0.3.2's rules and PIL itself, and its statistics.

Each RandAugment op is compared with PIL called exactly as timm 0.3.2's auto_augment.py calls it,
with timm's level rule written out below (`timm_level_arg`). Measured here (x86-64, Pillow 12):
every op, eager and in graph mode, equals PIL bit for bit (also on 200x240, 223x201 and 224x224
photos at random magnitudes). The pointwise/histogram ops are asserted exact; the enhance and
geometric ops allow max |diff| <= 1 level on at most 0.5% of the values, because Pillow's float
arithmetic there can round differently in a build that fuses multiply-adds (e.g. arm64 wheels).
"""

import functools
import math

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageEnhance, ImageOps

from convmae_jax.data import augment

EXACT_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "Solarize",
             "SolarizeIncreasing", "SolarizeAdd")
SIGNED_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing",
              "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")
NO_ARG_OPS = ("AutoContrast", "Equalize", "Invert")
ALL_OPS = tuple(dict.fromkeys(augment.RAND_TRANSFORMS + augment.RAND_INCREASING_TRANSFORMS))


def _tf():
  return augment._tf()


@functools.lru_cache(maxsize=None)
def _photo(width, height):
  """skimage's astronaut resized (PIL bicubic) to width x height: uint8 (height, width, 3)."""
  img = Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BICUBIC)
  return np.asarray(img)


@functools.lru_cache(maxsize=None)
def _test_image():
  """72x56 photo (not square: catches width/height mix-ups), each channel squeezed into its own
  range so that AutoContrast has work to do. uint8 (56, 72, 3)."""
  x = _photo(72, 56).astype(np.float32) * np.array([0.8, 0.7, 0.9]) + np.array([20, 40, 5])
  return x.astype(np.uint8)


def _seeds(n, salt=0):
  return np.stack([np.arange(n, dtype=np.int64), np.full(n, 1000 + salt, np.int64)], axis=1)


def _dataset(fn, *arrays, batch=400):
  tf = _tf()
  return tf.data.Dataset.from_tensor_slices(arrays).map(fn, num_parallel_calls=2,
                                                        deterministic=True).batch(batch)


def _map(fn, *arrays, batch=400, dataset=None):
  """Runs fn over the rows of `arrays` in a tf.data map (graph mode); stacked numpy outputs."""
  ds = _dataset(fn, *arrays, batch=batch) if dataset is None else dataset
  parts = list(ds.as_numpy_iterator())
  if isinstance(parts[0], tuple):
    return tuple(np.concatenate(p) for p in zip(*parts))
  if isinstance(parts[0], dict):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return np.concatenate(parts)


# ------------------------------------------------------------------- timm 0.3.2 + PIL reference


def timm_level_arg(name, magnitude, negate, translate_pct=0.45):
  """timm 0.3.2 LEVEL_TO_ARG[name](clip(magnitude, 0, 10)), _randomly_negate's outcome = negate."""
  level = min(10.0, max(0, magnitude))

  def randomly_negate(v):
    return -v if negate else v

  if name == "Rotate":
    return randomly_negate((level / 10.0) * 30.0)
  if name in ("ShearX", "ShearY"):
    return randomly_negate((level / 10.0) * 0.3)
  if name in ("TranslateXRel", "TranslateYRel"):
    return randomly_negate((level / 10.0) * translate_pct)
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return (level / 10.0) * 1.8 + 0.1
  if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
              "SharpnessIncreasing"):
    return 1.0 + randomly_negate((level / 10.0) * 0.9)
  if name == "Posterize":
    return int((level / 10.0) * 4)
  if name == "PosterizeIncreasing":
    return 4 - int((level / 10.0) * 4)
  if name == "Solarize":
    return int((level / 10.0) * 256)
  if name == "SolarizeIncreasing":
    return 256 - int((level / 10.0) * 256)
  if name == "SolarizeAdd":
    return int((level / 10.0) * 110)
  return None


def pil_op(img, name, arg, fill=augment.FILL):
  """The PIL call timm 0.3.2 makes for op `name` with argument `arg` (bicubic, fill = img_mean)."""
  kw = dict(resample=Image.BICUBIC, fillcolor=fill)
  w, h = img.size
  if name == "AutoContrast":
    return ImageOps.autocontrast(img)
  if name == "Equalize":
    return ImageOps.equalize(img)
  if name == "Invert":
    return ImageOps.invert(img)
  if name == "Rotate":
    return img.rotate(arg, **kw)
  if name.startswith("Posterize"):
    return img if arg >= 8 else ImageOps.posterize(img, arg)
  if name in ("Solarize", "SolarizeIncreasing"):
    return ImageOps.solarize(img, arg)
  if name == "SolarizeAdd":
    lut = [min(255, i + arg) if i < 128 else i for i in range(256)]
    return img.point(lut * 3)
  for prefix, enhance in (("Color", ImageEnhance.Color), ("Contrast", ImageEnhance.Contrast),
                          ("Brightness", ImageEnhance.Brightness),
                          ("Sharpness", ImageEnhance.Sharpness)):
    if name.startswith(prefix):
      return enhance(img).enhance(arg)
  matrix = {"ShearX": (1, arg, 0, 0, 1, 0), "ShearY": (1, 0, 0, arg, 1, 0),
            "TranslateXRel": (1, 0, arg * w, 0, 1, 0),
            "TranslateYRel": (1, 0, 0, 0, 1, arg * h)}[name]
  return img.transform(img.size, Image.AFFINE, matrix, **kw)


def _op_cases():
  for name in ALL_OPS:
    for magnitude in ((9.0,) if name in NO_ARG_OPS else (9.0, 8.37)):
      for negate in ((False, True) if name in SIGNED_OPS else (False,)):
        sign = "neg" if negate else "pos"
        yield pytest.param(name, magnitude, negate, id=f"{name}-m{magnitude}-{sign}")


@pytest.mark.parametrize("name,magnitude,negate", list(_op_cases()))
def test_op_matches_pil(name, magnitude, negate):
  x = _test_image()
  ref = np.asarray(pil_op(Image.fromarray(x), name, timm_level_arg(name, magnitude, negate)))
  out = augment.apply_op(x, name, magnitude, negate=negate).numpy()
  assert out.dtype == np.uint8 and out.shape == x.shape
  diff = np.abs(out.astype(np.int32) - ref.astype(np.int32))
  if name in EXACT_OPS:
    np.testing.assert_array_equal(out, ref)
  else:
    # Measured here: max 0, mean 0, 0 values differing (see the module docstring).
    assert diff.max() <= 1, f"{name}: max |diff| {diff.max()}"
    assert np.mean(diff > 0) <= 0.005, f"{name}: {np.mean(diff > 0):.4f} of values differ"
  assert not np.array_equal(out, x), f"{name} left the photo unchanged"


def test_geometric_ops_fill_and_direction():
  x = _photo(72, 56)
  fill = np.array(augment.FILL, np.uint8)
  # TranslateXRel +0.45: output x samples input x + 32.4, so the right 33 columns are fill.
  out = augment.OPS["TranslateXRel"](x, 0.45).numpy()
  assert (out[:, -32:] == fill).all() and (out[:, :40] != fill).any(axis=-1).mean() > 0.99
  out = augment.OPS["TranslateYRel"](x, -0.45).numpy()  # samples y - 25.2: top rows are fill
  assert (out[:25] == fill).all() and (out[25:] != fill).any(axis=-1).mean() > 0.99
  np.testing.assert_array_equal(augment.OPS["Rotate"](x, 0.0).numpy(), x)
  np.testing.assert_array_equal(augment.OPS["ShearX"](x, 0.0).numpy(), x)


def test_level_to_arg_matches_timm_bit_for_bit():
  tf = _tf()
  rng = np.random.default_rng(0)
  mags = np.concatenate([[-1.0, 0.0, 2.5, 7.5, 9.0, 10.0, 13.0], rng.normal(9.0, 0.5, 200),
                         rng.uniform(0.0, 10.0, 100)])
  level_fn = tf.function(augment.level_to_arg, autograph=False, reduce_retracing=True)
  for name in ALL_OPS:
    if name in NO_ARG_OPS:
      assert augment.level_to_arg(name, 9.0) is None
      continue
    for negate in (False, True):
      args = level_fn(name, tf.constant(mags), tf.constant(negate)).numpy()  # graph mode
      expected = [timm_level_arg(name, float(m), negate) for m in mags]
      assert args.tolist() == expected, name


def test_parse_rand_augment():
  cfg = augment.parse_rand_augment("rand-m9-mstd0.5-inc1")
  assert cfg == augment.RandAugmentConfig(num_ops=2, magnitude=9.0, magnitude_std=0.5,
                                          increasing=True, prob=0.5)
  assert cfg == augment.RandAugmentConfig()
  assert cfg.op_names == augment.RAND_INCREASING_TRANSFORMS and len(cfg.op_names) == 15
  # timm defaults for missing sections: m=10, n=2, mstd=0, non-increasing ops.
  cfg = augment.parse_rand_augment("rand-n3")
  assert (cfg.num_ops, cfg.magnitude, cfg.magnitude_std, cfg.increasing) == (3, 10.0, 0.0, False)
  assert cfg.op_names == augment.RAND_TRANSFORMS
  for bad, part in (("rand-m9-x1", "'x1'"), ("rnd-m9", "'rnd'"), ("rand-inc2", "'inc2'"),
                    ("rand-m9-m8", "'m8'"), ("rand-w0", "'w0'"), ("rand-mstdx", "'mstdx'")):
    with pytest.raises(ValueError, match=part) as e:
      augment.parse_rand_augment(bad)
    assert "rand-m9-mstd0.5-inc1" in str(e.value)  # says what is accepted


def test_bad_arguments():
  with pytest.raises(ValueError, match="num_ops"):
    augment.RandAugmentConfig(num_ops=-1)
  with pytest.raises(ValueError, match="prob"):
    augment.RandAugmentConfig(prob=1.5)
  with pytest.raises(ValueError, match="Cutout"):
    augment.apply_op(_photo(72, 56), "Cutout", 9.0)
  with pytest.raises(ValueError, match="uint8"):
    augment.rand_augment(_photo(72, 56).astype(np.float32), [0, 1])
  with pytest.raises(ValueError, match="probability"):
    augment.random_erasing(np.zeros((8, 8, 3), np.float32), [0, 1], probability=2.0)


# ---------------------------------------------------------------------------------- RandAugment


def test_rand_augment_params_distribution():
  tf = _tf()
  n = 3000
  cfg = augment.RandAugmentConfig()
  p = _map(lambda s: augment.rand_augment_params(s, cfg), _seeds(n), batch=n)
  assert p["op"].shape == (n, 2) and p["op"].min() >= 0 and p["op"].max() <= 14
  counts = np.bincount(p["op"].ravel(), minlength=15)
  expected = 2 * n / 15
  chi2 = np.sum((counts - expected)**2 / expected)
  assert chi2 < 36.1, counts  # chi-square, 14 dof: P(> 36.1) = 0.001
  sd = math.sqrt(0.25 / (2 * n))
  assert abs(p["apply"].mean() - 0.5) < 4 * sd
  assert abs(p["negate"].mean() - 0.5) < 4 * sd
  mag = p["magnitude"]
  assert mag.min() >= 0.0 and mag.max() <= 10.0
  # N(9, 0.5) clipped at 10 (2 sd): mean 8.996, std 0.486.
  assert abs(mag.mean() - 8.996) < 0.03 and abs(mag.std() - 0.486) < 0.03
  assert np.mean(mag == 10.0) == pytest.approx(0.0228, abs=0.01)
  # Same seed, same draws (eager here, graph above).
  q = augment.rand_augment_params(tf.constant(_seeds(1)[0]), cfg)
  for k in p:
    np.testing.assert_array_equal(q[k].numpy(), p[k][0])


def test_rand_augment_is_the_drawn_ops_in_order():
  tf = _tf()
  x = _photo(40, 40)
  cfg = augment.RandAugmentConfig(num_ops=3, prob=0.8)
  for seed in _seeds(12, salt=1):
    seed = tf.constant(seed)
    p = augment.rand_augment_params(seed, cfg)
    want = tf.constant(x)
    for i in range(3):
      if p["apply"][i]:
        want = augment.apply_op(want, cfg.op_names[int(p["op"][i])], p["magnitude"][i],
                                negate=p["negate"][i])
    np.testing.assert_array_equal(augment.rand_augment(x, seed, cfg).numpy(), want.numpy())


def test_rand_augment_deterministic_in_graph_and_eager():
  tf = _tf()
  x = _photo(40, 40)
  seeds = _seeds(24, salt=2)
  cfg = augment.RandAugmentConfig()
  ds = _dataset(lambda s: augment.rand_augment(tf.constant(x), s, cfg), seeds)
  out = _map(None, dataset=ds)
  assert out.dtype == np.uint8 and out.shape == (24, 40, 40, 3)
  np.testing.assert_array_equal(_map(None, dataset=ds), out)  # a second pass: same images
  for i in (0, 5, 17):
    np.testing.assert_array_equal(augment.rand_augment(x, seeds[i], cfg).numpy(), out[i])
  changed = [o.tobytes() for o in out if not np.array_equal(o, x)]
  assert len(changed) >= 12 and len(set(changed)) == len(changed)  # different seeds differ


def test_rand_augment_untouched_fraction():
  tf = _tf()
  # Values span [0, 250]: every op of the set, at magnitudes near 9, changes this image, and two
  # ops undo each other only as Invert twice, or Invert with a SolarizeIncreasing threshold <= 5
  # (level >= 9.8), or threshold 0 then Invert: P(untouched | both applied) ~ 0.005.
  x = _photo(32, 32).astype(np.float32)
  x = np.round((x - x.min()) * (250 / (x.max() - x.min()))).astype(np.uint8)
  n = 1200
  cfg = augment.RandAugmentConfig()
  out = _map(lambda s: augment.rand_augment(tf.constant(x), s, cfg), _seeds(n, salt=3))
  untouched = np.mean(np.all(out == x, axis=(1, 2, 3)))  # measured: 0.2425
  # Both ops skipped: 0.5**2 (+ 0.25 * 0.005 for ops undoing each other).
  assert abs(untouched - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n) + 0.002, untouched
  always = augment.RandAugmentConfig(prob=1.0)
  out = _map(lambda s: augment.rand_augment(tf.constant(x), s, always), _seeds(200, salt=4))
  assert np.sum(np.all(out == x, axis=(1, 2, 3))) <= 5  # expected ~1 (ops undoing each other)


# -------------------------------------------------------------------------------- RandomErasing


def _erasing_runs(x, n, salt, **kw):
  tf = _tf()
  return _map(lambda s: augment.random_erasing(tf.constant(x), s, **kw), _seeds(n, salt=salt))


def test_random_erasing_box_probability_and_noise():
  h, w = 40, 48
  x = ((_photo(w, h) / 255.0 - 0.45) / 0.225).astype(np.float32)
  n = 1200
  out = _erasing_runs(x, n, salt=5)
  assert out.dtype == np.float32 and out.shape == (n, h, w, 3)
  erased, noise = 0, []
  for o in out:
    changed = np.any(o.view(np.uint32) != x.view(np.uint32), axis=-1)
    if not changed.any():
      continue
    erased += 1
    rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    bh, bw = bottom - top, right - left
    box = np.zeros_like(changed)
    box[top:bottom, left:right] = True
    np.testing.assert_array_equal(changed, box)  # one axis-aligned box, all of it changed
    assert bh < h and bw < w
    inside = o[top:bottom, left:right]
    assert np.all(inside != x[top:bottom, left:right])  # every channel of every pixel
    # h = round(sqrt(a * r)), w = round(sqrt(a / r)), a in [0.02, 1/3] * h * w.
    slack = 0.5 * (bh + bw) + 0.25
    assert 0.02 * h * w - slack <= bh * bw <= h * w / 3 + slack
    # Some aspect r in [0.3, 1/0.3] rounds to this box: (bh -+ 0.5) / (bw +- 0.5) brackets r.
    assert (bh - 0.5) / (bw + 0.5) <= 1 / 0.3 and (bh + 0.5) / (bw - 0.5) >= 0.3
    noise.append(inside.ravel())
  sd = math.sqrt(0.25 * 0.75 / n)
  assert abs(erased / n - 0.25) < 4 * sd, erased / n
  noise = np.concatenate(noise)
  assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1.0) < 0.02
  assert abs(np.mean(np.abs(noise) < 1.0) - 0.6827) < 0.01  # normal, not uniform


def test_random_erasing_deterministic_and_probability_bounds():
  tf = _tf()
  x = np.random.default_rng(0).normal(size=(24, 24, 3)).astype(np.float32)
  graph = _erasing_runs(x, 8, salt=6, probability=1.0)
  for i in range(8):
    eager = augment.random_erasing(x, _seeds(8, salt=6)[i], probability=1.0).numpy()
    np.testing.assert_array_equal(eager, graph[i])
  assert all(not np.array_equal(g, x) for g in graph)
  np.testing.assert_array_equal(_erasing_runs(x, 50, salt=7, probability=0.0),
                                np.broadcast_to(x, (50, 24, 24, 3)))
  assert tf.is_tensor(augment.random_erasing(x, [1, 2]))
