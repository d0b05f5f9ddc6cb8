"""mIoU / mAcc / aAcc of a segmentor on a labelled split, with mmseg's semantics, and the
sliding-window inference of mmseg's test config.

* :func:`confusion_matrix`: (K, K) counts ``cm[label, prediction]`` over the pixels whose label is
  not the ignore index; summed over every batch (on the devices, so over every host's rows).
* :func:`segmentation_scores`: from the summed matrix, per class ``IoU = TP / (TP + FP + FN)`` and
  ``Acc = TP / (TP + FN)``; a class absent from both predictions and labels has IoU NaN (0 / 0) and
  one absent from the labels Acc NaN; ``mIoU`` and ``mAcc`` are the means over the classes that are
  not NaN (mmseg's ``np.nanmean``); ``aAcc`` = all TP / all labelled pixels. Percent.
* :func:`slide_logits`: mmseg's ``slide_inference`` (windows of ``crop`` every ``stride``, the last
  one moved back inside the image, logits of overlapping windows averaged) on a batch of images
  padded into one canvas, each with its own valid size, so that one compiled program serves every
  image shape. A window of an image smaller than the crop extends into the canvas padding (mmseg
  would feed the smaller crop; this model has a fixed input size); windows that no image in the
  batch needs are skipped.
* :class:`SegmentationEvaluator`: the loop's evaluator: mIoU/mAcc/aAcc every ``every_steps``, the best
  model (by mIoU) kept, per-class IoU/Acc written as JSON.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from convmae_jax.train import sharding as sharding_lib
from convmae_jax.train.evaluators.best import BestModelEvaluator

IGNORE_INDEX = 255
EVAL_KEYS = ("image", "label", "valid_hw")


# --------------------------------------------------------------------------------------------------
# Metrics.
# --------------------------------------------------------------------------------------------------
def confusion_matrix(pred: jax.Array, label: jax.Array, num_classes: int, *,
                     ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """(K, K) int32 counts of (label, prediction) pairs over pixels whose label is not
  ``ignore_index`` (labels outside [0, K) other than it are ignored too). pred, label: same shape,
  integers."""
  label = label.astype(jnp.int32).reshape(-1)
  pred = pred.astype(jnp.int32).reshape(-1)
  valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
  index = jnp.where(valid, label * num_classes + jnp.clip(pred, 0, num_classes - 1), 0)
  counts = jnp.zeros((num_classes * num_classes,), jnp.int32).at[index].add(valid.astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def segmentation_scores(cm: np.ndarray, class_names=None) -> dict:
  """Scores of a summed (K, K) confusion matrix (module docstring): {"mIoU", "mAcc", "aAcc"}
  (percent, floats) and "per_class": {name: {"IoU", "Acc"}} (percent, NaN where undefined)."""
  cm = np.asarray(cm, np.float64)
  tp = np.diag(cm)
  area_label = cm.sum(axis=1)
  area_pred = cm.sum(axis=0)
  union = area_label + area_pred - tp
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = tp / union
    acc = tp / area_label
  total = area_label.sum()
  names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
  nanmean = lambda v: float(np.nanmean(v)) if np.any(~np.isnan(v)) else float("nan")
  return {"mIoU": 100.0 * nanmean(iou), "mAcc": 100.0 * nanmean(acc),
          "aAcc": 100.0 * float(tp.sum() / total) if total else float("nan"),
          "per_class": {n: {"IoU": 100.0 * float(i), "Acc": 100.0 * float(a)}
                        for n, i, a in zip(names, iou, acc)}}


# --------------------------------------------------------------------------------------------------
# Sliding-window inference.
# --------------------------------------------------------------------------------------------------
def num_windows(size, crop: int, stride: int):
  """mmseg's window count along one axis: ``max(size − crop + stride − 1, 0) // stride + 1``."""
  return jnp.maximum(size - crop + stride - 1, 0) // stride + 1


def slide_logits(logits_fn, images: jax.Array, *, crop: tuple[int, int], stride: tuple[int, int],
                 num_classes: int, valid_hw: jax.Array | None = None) -> jax.Array:
  """Averaged window logits (N, H, W, K) float32 of images (N, H, W, C) placed top-left in an
  H x W canvas, image n occupying ``valid_hw[n]`` = (h, w) (default: all of it).

  ``logits_fn(crops (N, ch, cw, C)) -> (N, ch, cw, K)``. For window (i, j) of image n (mmseg):
  ``y1 = i·sh; y2 = min(y1 + ch, h); y1 = max(y2 − ch, 0)`` (same for x), run for i < the image's
  window count; its logits are added over ``[y1, min(y1 + ch, h))`` and divided by how many windows
  covered each pixel. Pixels outside (h, w) are 0. H >= ch and W >= cw is required.
  """
  n, hc, wc, _ = images.shape
  ch, cw = crop
  sh, sw = stride
  if hc < ch or wc < cw:
    raise ValueError(f"canvas {hc}x{wc} is smaller than the crop {ch}x{cw}; pad the images to at "
                     f"least the crop size")
  if valid_hw is None:
    valid_hw = jnp.tile(jnp.asarray([[hc, wc]], jnp.int32), (n, 1))
  h, w = valid_hw[:, 0], valid_hw[:, 1]
  n_h, n_w = num_windows(h, ch, sh), num_windows(w, cw, sw)          # per image
  max_h = max(hc - ch + sh - 1, 0) // sh + 1                         # static: the canvas's count
  max_w = max(wc - cw + sw - 1, 0) // sw + 1
  rows, cols = jnp.arange(hc), jnp.arange(wc)

  def body(carry, k):
    preds, count = carry
    i, j = k // max_w, k % max_w
    active = (i < n_h) & (j < n_w)                                   # (N,)
    y2 = jnp.minimum(i * sh + ch, h)
    y1 = jnp.maximum(y2 - ch, 0)
    x2 = jnp.minimum(j * sw + cw, w)
    x1 = jnp.maximum(x2 - cw, 0)
    # Where an image is smaller than the crop, the crop starts at 0 and runs into the padding.
    y1c, x1c = jnp.minimum(y1, hc - ch), jnp.minimum(x1, wc - cw)

    def run(carry):
      preds, count = carry
      crops = jax.vmap(lambda im, a, b: jax.lax.dynamic_slice(im, (a, b, 0), (ch, cw, im.shape[-1])))(
          images, y1c, x1c)
      out = logits_fn(crops).astype(jnp.float32)
      placed = jax.vmap(lambda o, a, b: jax.lax.dynamic_update_slice(
          jnp.zeros((hc, wc, num_classes), jnp.float32), o, (a, b, 0)))(out, y1c, x1c)
      inside = (((rows[None, :] >= y1[:, None]) & (rows[None, :] < y2[:, None]))[:, :, None]
                & ((cols[None, :] >= x1[:, None]) & (cols[None, :] < x2[:, None]))[:, None, :])
      inside = inside & active[:, None, None]
      return (preds + jnp.where(inside[..., None], placed, 0.0),
              count + inside.astype(jnp.float32))

    return jax.lax.cond(jnp.any(active), run, lambda c: c, (preds, count)), None

  init = (jnp.zeros((n, hc, wc, num_classes), jnp.float32), jnp.zeros((n, hc, wc), jnp.float32))
  (preds, count), _ = jax.lax.scan(body, init, jnp.arange(max_h * max_w))
  return preds / jnp.maximum(count, 1.0)[..., None]


def predict_fn(graphdef_eval, *, mode: str, crop: tuple[int, int], stride: tuple[int, int],
               num_classes: int):
  """(params, rest, batch) -> summed (K, K) confusion matrix of the batch. ``mode``: "whole"
  (the model on the whole canvas, which must be its input size) or "slide"."""

  def step(p, r, batch):
    model = nnx.merge(graphdef_eval, p, r)
    images = batch["image"]
    if mode == "whole":
      logits = model(images)
    else:
      logits = slide_logits(model, images, crop=crop, stride=stride, num_classes=num_classes,
                            valid_hw=batch["valid_hw"])
    return confusion_matrix(jnp.argmax(logits, axis=-1), batch["label"], num_classes)

  return step


class SegmentationEvaluator(BestModelEvaluator):
  """Every ``every_steps`` steps (0: at the end only) and at the last step: the confusion matrix
  over the whole split, then ``eval_mIoU``, ``eval_mAcc``, ``eval_aAcc`` written as scalars,
  ``{workdir}/eval/step_XXXXXX.json`` with the per-class IoU/Acc, and the best model by mIoU as a
  model-only checkpoint in ``best_dir`` (``best_mIoU`` travels in the training checkpoints)."""

  meta_key = "best_mIoU"

  def __init__(self, *, eval_data, split: str, every_steps: int, graphdef_eval, shardings, writer,
               best_dir, best_meta: dict, json_dir, num_classes: int, class_names=None,
               mode: str = "slide", crop=(512, 512), stride=(341, 341), is_chief: bool = True,
               compiler_options=None):
    super().__init__(eval_data=eval_data, every_steps=every_steps, graphdef_eval=graphdef_eval,
                     shardings=shardings, writer=writer, best_dir=best_dir, best_meta=best_meta)
    self.json_dir = json_dir
    self.class_names = class_names
    self.is_chief = is_chief
    self.description = (f"mIoU ({mode}) on {eval_data.num_examples} images of {split!r} "
                        f"{self.period()}")
    self.step_fn = jax.jit(
        predict_fn(graphdef_eval, mode=mode, crop=tuple(crop), stride=tuple(stride),
                   num_classes=num_classes),
        in_shardings=(shardings.params, shardings.rest, {k: shardings.batch for k in EVAL_KEYS}),
        out_shardings=shardings.replicated, compiler_options=compiler_options)

  def evaluate(self, params, rest) -> dict:
    total = None
    for batch in self.eval_data:
      arrays = {k: sharding_lib.to_global_array(np.asarray(batch[k]), self.batch_sharding)
                for k in EVAL_KEYS}
      cm = np.asarray(jax.device_get(self.step_fn(params, rest, arrays)), np.int64)
      total = cm if total is None else total + cm                    # int64 across batches
    return segmentation_scores(total, self.class_names)

  def __call__(self, step: int, params, rest) -> dict[str, float]:
    scores = self.evaluate(params, rest)
    scalars = {f"eval_{k}": scores[k] for k in ("mIoU", "mAcc", "aAcc")}
    self.writer.write_scalars(step, scalars)
    improved = self.improves(scores["mIoU"])
    logging.info("eval step %d | mIoU %.2f%% | mAcc %.2f%% | aAcc %.2f%%%s", step, scores["mIoU"],
                 scores["mAcc"], scores["aAcc"], " | best so far" if improved else "")
    if self.is_chief:
      self.json_dir.mkdir(parents=True, exist_ok=True)
      (self.json_dir / f"step_{step:06d}.json").write_text(
          json.dumps({"step": step, **scores}, indent=1, allow_nan=True))
    if improved:
      self.keep_best(step, params, rest, {k: scores[k] for k in ("mIoU", "mAcc", "aAcc")})
    return scalars
