"""Semantic segmentation (``config.job = "segment"``): UperNet on a ConvViT segmentation backbone,
the official ADE20K recipe of ConvMAE's ``SEG/`` (mmseg 0.11, spec §5.2), on the one training loop.

* model: ``models.upernet.Segmentor`` on ``config.model`` (``convvit_seg_*``; ``convvit_det_*``
  works too), its input ``config.crop_size`` pixels square;
* starting weights: ``config.init_from`` (a pretraining workdir, a model-only checkpoint, an
  official ``.pth``) through ``weights.init_backbone``; the heads start from mmseg's init; empty =
  random initialisation;
* optimizer: AdamW with the segmentation layer decay and weight-decay set
  (``optim.make_segmentation_optimizer``); schedule: mmcv's poly with linear warmup
  (``optim.WarmupPoly``, absolute ``config.lr``, not scaled by the batch size);
* loss: decode-head CE + 0.4 x auxiliary CE, ignore index 255 (``Segmentor.loss``);
* data: ``data.segmentation`` (mmseg's train pipeline; evaluation on a padded canvas);
* evaluation: mIoU/mAcc/aAcc every ``eval_every_steps`` (``evaluators.segmentation``), the best
  model kept in ``{workdir}/best``, per-class IoU/Acc in ``{workdir}/eval/step_XXXXXX.json``.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from absl import logging
from flax import nnx

from convmae_jax import checkpoints, data, models, weights
from convmae_jax.data import segmentation as seg_data
from convmae_jax.models import upernet
from convmae_jax.train import optim, validation, xla_cpu
from convmae_jax.train.errors import ConfigError
from convmae_jax.train.evaluators.segmentation import SegmentationEvaluator
from convmae_jax.train.loop import Job, Setup, TrainResult

BEST_SUBDIR = "best"
EVAL_SUBDIR = "eval"
# Config fields of the backbone (over the model size's own values).
_BACKBONE_FROM_CONFIG = {"img_size": "crop_size", "drop_path_rate": "drop_path_rate",
                         "dtype": "dtype", "remat": "remat"}
_HEAD_FIELDS = ("num_classes", "channels", "pool_scales", "aux_channels", "aux_num_convs",
                "aux_weight", "dropout", "avg_non_ignore")


@dataclasses.dataclass(frozen=True)
class SegmentorPlan:
  """The backbone and head configs; ``to_dict`` is what checkpoints record as model_kwargs."""
  backbone: models.BackboneConfig
  head: upernet.HeadConfig

  def to_dict(self) -> dict:
    return {**self.backbone.to_dict(), **self.head.to_dict()}


def _pair(config, name: str) -> tuple[int, int]:
  value = config.get(name)
  try:
    a, b = (int(v) for v in value)
  except (TypeError, ValueError):
    raise ConfigError(f"config.{name}={value!r} is not accepted: expected two positive integers "
                      "(height, width).") from None
  if a < 1 or b < 1:
    raise ConfigError(f"config.{name}={value!r} is not accepted: expected two positive integers.")
  return a, b


def validate_segmentation_config(config, *, num_devices: int | None = None,
                                 process_count: int | None = None) -> validation.RunPlan:
  """Checks a segmentation config before any compute; the resolved plan (ConfigError otherwise)."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  names = [n for n in models.names() if models.family(n) in ("convvit_seg", "convvit_det")]
  if config.model not in names:
    raise ConfigError(f"config.model={config.model!r} is not a segmentation backbone; accepted: "
                      f"{names}.")
  if not validation._is_registered_dataset(config.dataset):
    raise ConfigError(f"config.dataset={config.dataset!r} is not a known dataset; accepted: "
                      "'scene_parse150', 'convmae_demo_segments' or another TFDS dataset with an "
                      "image and a segmentation mask feature.")
  dtype = validation.compute_dtype(config)
  kwargs = {k: v for k, v in dict(config.get("model_kwargs", None) or {}).items() if v is not None}
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  kwargs.update({m: config[c] for m, c in _BACKBONE_FROM_CONFIG.items()})
  kwargs["dtype"] = dtype
  try:
    backbone = models.config_for(config.model, **kwargs)
    head = upernet.head_config_from({k: config[k] for k in _HEAD_FIELDS})
    upernet.check_backbone_fits(backbone)
  except TypeError as e:
    raise ConfigError(f"config.model_kwargs: {e}") from None
  except ValueError as e:
    raise ConfigError(f"model {config.model} with crop_size={config.crop_size}: {e}") from None
  mesh_shape = validation._check_mesh_batch_steps(config, num_devices, process_count)
  validation._positive_int(config, "eval_every_steps", allow_unset=True)
  validation._positive_int(config, "eval_batch_size")
  dp = mesh_shape[0] * mesh_shape[1]
  if config.eval_batch_size % dp or config.eval_batch_size % process_count:
    raise ConfigError(f"config.eval_batch_size={config.eval_batch_size} must be a multiple of the "
                      f"{dp} data-parallel devices and the {process_count} processes.")
  if not 0.0 < float(config.layer_decay) <= 1.0:
    raise ConfigError(f"config.layer_decay={config.layer_decay!r} must lie in (0, 1] (1 = no decay).")
  if config.lr <= 0:
    raise ConfigError(f"config.lr={config.lr!r} must be > 0 (absolute peak lr; 1e-4 official).")
  if config.eval_mode not in ("slide", "whole"):
    raise ConfigError(f"config.eval_mode={config.eval_mode!r} is not accepted; use 'slide' or 'whole'.")
  crop = int(config.crop_size)
  canvas = _pair(config, "eval_canvas")
  stride = _pair(config, "eval_stride")
  _pair(config, "train_scale")
  _pair(config, "test_scale")
  if config.eval_mode == "whole" and canvas != (crop, crop):
    raise ConfigError(f"config.eval_mode='whole' runs the model on the whole canvas, so "
                      f"config.eval_canvas={tuple(canvas)} must equal (crop_size, crop_size) = "
                      f"{(crop, crop)}; or use eval_mode='slide'.")
  if canvas[0] < crop or canvas[1] < crop:
    raise ConfigError(f"config.eval_canvas={tuple(canvas)} is smaller than the crop {crop}: the "
                      "sliding windows must fit in it.")
  if any(s > crop for s in stride):
    raise ConfigError(f"config.eval_stride={tuple(stride)} is larger than the crop {crop}: pixels "
                      "between windows would never be predicted.")
  lo, hi = (float(v) for v in config.ratio_range)
  if not 0 < lo <= hi:
    raise ConfigError(f"config.ratio_range={tuple(config.ratio_range)!r}: expected 0 < low <= high.")
  if not 0.0 < float(config.cat_max_ratio) <= 1.0:
    raise ConfigError(f"config.cat_max_ratio={config.cat_max_ratio!r} must lie in (0, 1] (1 = off).")

  return validation.RunPlan(mesh_shape=mesh_shape, model_overrides=kwargs,
                            model_config=SegmentorPlan(backbone, head))


class Segment(Job):
  """``config.job = "segment"`` (configs/segment.py, configs/demo_segment.py)."""

  batch_keys = ("image", "label")

  def __init__(self, config):
    plan = validate_segmentation_config(config)
    super().__init__(config, plan)
    self.init_from = ""
    self.class_names = None
    self.miou = None

  # ------------------------------------------------------------------------------------- checks
  def check_inputs(self, workdir: str) -> None:
    config = self.config
    data_dir = config.get("data_dir") or None
    try:
      builder, n = seg_data.mask_info(config.dataset, split=config.train_split,
                                      mask_key=config.mask_key, data_dir=data_dir)
      seg_data.mask_info(config.dataset, split=config.eval_split, mask_key=config.mask_key,
                         data_dir=data_dir)
    except data.DatasetNotPreparedError:
      raise
    except ValueError as e:
      raise ConfigError(str(e)) from None
    if n is not None and n != config.num_classes:
      raise ConfigError(f"config.num_classes={config.num_classes} does not match dataset "
                        f"{config.dataset!r}, which has {n} classes"
                        f"{' after reduce_zero_label' if config.reduce_zero_label else ''}; set "
                        f"--config.num_classes={n}.")
    self.class_names = seg_data.class_names(builder)
    init_from = config.get("init_from", "") or ""
    if init_from and not (os.path.exists(init_from) or str(init_from).startswith("gs://")):
      raise ConfigError(f"config.init_from={init_from!r} does not exist; accepted: a pretraining "
                        "workdir, a model-only checkpoint folder, or a .pth/.safetensors file.")
    self.init_from = init_from
    if init_from and checkpoints.latest_step(workdir) is None:
      # Read now (an unreadable file stops the run before any compute); the keys and shapes are
      # checked by weights.init_backbone before it changes anything.
      try:
        weights.read_state_dict(init_from)
      except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"config.init_from={init_from!r}: {e}") from None

  # ------------------------------------------------------------------------------------- model
  def create_model(self, **backbone_overrides):
    """The segmentor of the plan; ``backbone_overrides`` change backbone config fields (the eval
    graph without remat)."""
    plan = self.plan.model_config
    backbone = dataclasses.replace(plan.backbone, **backbone_overrides)
    return upernet.Segmentor(backbone, plan.head, rngs=nnx.Rngs(self.config.seed))

  def make_schedule(self, total_steps: int, warmup_steps: float):
    return optim.WarmupPoly(peak_lr=float(self.config.lr), warmup_steps=float(warmup_steps),
                            total_steps=int(total_steps), min_lr=float(self.config.min_lr),
                            power=float(self.config.poly_power),
                            warmup_ratio=float(self.config.warmup_ratio))

  def make_optimizer(self, schedule, abstract_params):
    return optim.make_segmentation_optimizer(self.config, schedule, abstract_params)

  def initialise(self, model) -> None:
    if not self.init_from:
      logging.warning("config.init_from is empty: training the segmentor from random "
                      "initialisation.")
      return
    try:
      report = weights.init_backbone(model.backbone, self.init_from)
    except (ValueError, FileNotFoundError) as e:
      raise ConfigError(f"config.init_from={self.init_from!r}: {e}") from None
    logging.info("Initialised the backbone from %s (%s checkpoint, %d tensors; position embedding "
                 "resized %s; kept initial: %d).", self.init_from, report["kind"], report["loaded"],
                 report["pos_embed_resized"] or "no", len(report["kept_initial"]))

  # ------------------------------------------------------------------------------------- step
  def loss(self, model, batch: dict):
    return model.loss(batch["image"], batch["label"])

  def _examples(self, split: str, num_examples: int | None = None):
    config = self.config
    builder = data.get_builder(config.dataset, data_dir=config.get("data_dir") or None)
    return seg_data.read_split(builder, split, mask_key=config.mask_key, num_examples=num_examples)

  def train_data(self, start_step: int):
    config = self.config
    crop = int(config.crop_size)
    return seg_data.TrainBatches(
        self._examples(config.train_split), global_batch_size=config.batch_size, seed=config.seed,
        start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count(), split=config.train_split, crop=(crop, crop),
        scale=tuple(int(v) for v in config.train_scale),
        ratio_range=tuple(float(v) for v in config.ratio_range),
        cat_max_ratio=float(config.cat_max_ratio), reduce_zero=bool(config.reduce_zero_label),
        flip=bool(config.hflip), photometric=bool(config.photometric))

  def evaluators(self, setup: Setup):
    config = self.config
    n = config.eval_num_examples if config.eval_num_examples > 0 else None
    eval_data = seg_data.EvalBatches(
        self._examples(config.eval_split, n), global_batch_size=config.eval_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        scale=tuple(int(v) for v in config.test_scale), canvas=tuple(config.eval_canvas),
        reduce_zero=bool(config.reduce_zero_label), split=config.eval_split)
    crop = int(config.crop_size)
    # Every sliding window is a backbone-sized image: the product counts one per image at least.
    options, line = xla_cpu.choose(config, self.plan.model_config, self.plan.mesh_shape,
                                   forward_only=True, batch_size=config.eval_batch_size)
    logging.info("Evaluation: %s.", line)
    self.miou = SegmentationEvaluator(
        eval_data=eval_data, split=config.eval_split,
        every_steps=config.eval_every_steps, graphdef_eval=self._graphdef_eval(setup),
        shardings=setup.shardings, writer=setup.writer, best_dir=setup.workdir / BEST_SUBDIR,
        best_meta={"model_name": config.model, "model_kwargs": self.plan.model_config.to_dict(),
                   "eval_split": config.eval_split, "dataset": config.dataset, "job": "segment"},
        json_dir=setup.workdir / EVAL_SUBDIR, num_classes=config.num_classes,
        class_names=self.class_names, mode=config.eval_mode, crop=(crop, crop),
        stride=tuple(config.eval_stride), is_chief=setup.is_chief, compiler_options=options)
    return [self.miou]

  def _graphdef_eval(self, setup: Setup):
    """The loop's eval graph, without the backbone's remat when it is on: evaluation has no
    backward pass to save memory for, and nnx.remat cannot run inside the sliding-window loop (a
    scan over windows). The parameters and state are the same (remat is in the graph only)."""
    if not self.plan.model_config.backbone.remat:
      return setup.graphdef_eval
    abstract = nnx.eval_shape(lambda: self.create_model(remat=False))
    abstract.eval()
    graphdef, _, _ = nnx.split(abstract, self.trainable, ...)
    return graphdef

  def checkpoint_meta(self) -> dict:
    return {"job": "segment"}

  def summary(self, result: TrainResult, setup: Setup) -> None:
    if not result.metrics:
      return
    last = result.metrics[max(result.metrics)]
    logging.info("Done: step %d; eval mIoU %.2f%% mAcc %.2f%% aAcc %.2f%% (best mIoU %.2f%%, "
                 "weights in %s; per-class IoU in %s).", result.step, last["eval_mIoU"],
                 last["eval_mAcc"], last["eval_aAcc"], self.miou.best,
                 setup.workdir / BEST_SUBDIR, setup.workdir / EVAL_SUBDIR)
