"""The segmentation job (``config.job = "segment"``) on the embedded ``convmae_demo_segments``: the
demo dataset's labels, the train pipeline's steps, config errors before compute, a few training
steps with mIoU reported and a resumed run equal to an uninterrupted one, a pretraining checkpoint
as the starting backbone.

CPU, a tiny UperNet (16/8 head channels) on 64-px crops, batch 4, 3 steps.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from convmae_jax import configs, data
from convmae_jax.data import demo_segments
from convmae_jax.data import segmentation as seg_data
from convmae_jax.train import trainer
from convmae_jax.train.errors import ConfigError

DEMO = demo_segments.NAME


def _tiny(**over):
  c = configs.get_config("demo_segment")
  c.channels = 16
  c.aux_channels = 8
  c.batch_size = 4
  c.eval_batch_size = 8
  c.eval_num_examples = 12
  c.num_train_steps = 3
  c.warmup_steps = 1
  c.log_every_steps = 1
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 1
  c.async_checkpointing = False
  c.prefetch = 1
  for k, v in over.items():
    c[k] = v
  return c


def test_demo_dataset_labels_and_fixed_content():
  """Version 2.0.0's facts (demo_segments docstring): one large digit per image, background about
  three quarters of the pixels, every digit class in both splits, a fixed generator."""
  builder = data.get_builder(DEMO)
  assert str(builder.info.version) == "2.0.0"
  assert builder.info.splits["train"].num_examples == 600
  assert builder.info.splits["test"].num_examples == 150
  facts = {"train": (1811196, [72, 64, 66, 47, 56, 69, 68, 62, 45, 51]),
           "test": (452226, [17, 11, 15, 19, 22, 16, 6, 12, 15, 17])}
  for split, (background, images_per_digit) in facts.items():
    examples = seg_data.read_split(builder, split, mask_key="annotation")
    counts = np.zeros(demo_segments.NUM_CLASSES, np.int64)
    per_digit = np.zeros(10, np.int64)
    for image_bytes, mask_bytes in examples:
      image, labels = seg_data.decode(image_bytes, mask_bytes)
      assert image.shape == (64, 64, 3) and labels.shape == (64, 64)
      present = np.unique(labels)
      assert len(present) == 2 and present[0] == 0                    # background + one digit
      digit_pixels = np.count_nonzero(labels)
      assert 500 < digit_pixels < 1800                                 # a 40-56 px digit, thick
      per_digit[present[1] - 1] += 1
      counts += np.bincount(labels.ravel(), minlength=demo_segments.NUM_CLASSES)
    assert counts.size == 11 and counts.sum() == len(examples) * 64 * 64   # labels 0..10 only
    assert counts[0] == background                                       # 73.7% / 73.6%
    assert per_digit.tolist() == images_per_digit
  # The generator of example i is fixed: building a stored example again gives the same pixels.
  import tensorflow_datasets as tfds
  stored = next(iter(tfds.as_numpy(builder.as_dataset(split="test", shuffle_files=False).take(1))))
  rng = np.random.default_rng((demo_segments.SEED, 1, int(stored["index"])))
  image, labels = demo_segments.make_example(rng, demo_segments._photos("test"),
                                             *demo_segments._digits("test"))
  np.testing.assert_array_equal(stored["annotation"][..., 0], labels)
  np.testing.assert_array_equal(stored["image"], image)


def test_train_pipeline_steps():
  """reduce_zero_label, mmcv's rescale, cat_max_ratio and padding with the ignore index."""
  labels = np.array([[0, 1, 2], [150, 255, 3]], np.uint8)
  np.testing.assert_array_equal(seg_data.reduce_zero_label(labels),
                                [[255, 0, 1], [149, 255, 2]])
  assert seg_data.rescale_size(512, 683, (2048, 512)) == (512, 683)
  assert seg_data.rescale_size(300, 1500, (2048, 512)) == (410, 2048)   # the long side binds
  assert seg_data.rescale_size(512, 683, (2048, 512), 0.5) == (256, 342)
  # cat_max_ratio: a map that is 75% class 1 and 25% class 2 (top-left): the kept crop (one
  # exists among the draws) has its largest class under the ratio.
  lab = np.ones((64, 64), np.uint8)
  lab[:32, :32] = 2
  image = np.zeros((64, 64, 3), np.uint8)
  for seed in range(5):
    _, crop = seg_data.random_crop(np.random.default_rng(seed), image, lab, (32, 32), 0.75)
    _, counts = np.unique(crop, return_counts=True)
    assert crop.shape == (32, 32) and counts.max() / counts.sum() < 0.75
  # A small image is padded to the crop: 0 pixels around, 255 labels.
  builder = data.get_builder(DEMO)
  ex = seg_data.read_split(builder, "train", mask_key="annotation", num_examples=1)[0]
  img, lab = seg_data.train_example(*ex, np.random.default_rng(0), crop=(96, 96), scale=(64, 64),
                                    ratio_range=(1.0, 1.0), cat_max_ratio=1.0, reduce_zero=False)
  assert img.shape == (96, 96, 3) and lab.shape == (96, 96)
  assert np.all(lab[64:] == 255) and np.all(lab[:, 64:] == 255) and np.all(img[64:] == 0)
  assert np.all(lab[:64, :64] <= 10)


def test_bad_records_are_replaced_flagged_and_left_out_of_the_scores(caplog):
  """A truncated image, a label map that is not an image and a pair of different sizes neither stop
  the pipeline nor shift its batches: in training each is the mean-colour image (0 after
  normalisation) with all-ignored labels, flagged with its split[index] and the decoder's message,
  which the device prefetcher keeps on the host and the metrics window logs once; in evaluation
  each is logged and left out (all-ignored labels). Good rows are what they would be without them."""
  from PIL import Image
  import io
  from convmae_jax.data import pipeline
  from convmae_jax.train import input_pipeline, metrics, sharding as sharding_lib

  good = seg_data.read_split(data.get_builder(DEMO), "train", mask_key="annotation",
                             num_examples=8)
  small = io.BytesIO()
  Image.fromarray(np.zeros((32, 32), np.uint8)).save(small, format="PNG")
  bad = {1: (good[1][0][:200], good[1][1]),          # image cut short
         4: (good[4][0], b"not an image"),             # label map unreadable
         6: (good[6][0], small.getvalue())}           # 64x64 image, 32x32 label map
  examples = [bad.get(i, ex) for i, ex in enumerate(good)]
  kw = dict(global_batch_size=8, seed=0, start_step=0, process_index=0, process_count=1,
            crop=(48, 48), scale=(64, 64), ratio_range=(0.8, 1.2), cat_max_ratio=0.75,
            reduce_zero=False)
  batch = next(seg_data.TrainBatches(examples, split="train", **kw))
  clean = next(seg_data.TrainBatches(good, split="train", **kw))
  order = seg_data.epoch_order(0, 0, 8)              # row r reads example order[r]
  flagged = np.flatnonzero(batch[pipeline.BAD_KEY])
  assert sorted(order[flagged].tolist()) == [1, 4, 6]
  for r in range(8):
    if r in flagged:
      assert batch[pipeline.ID_KEY][r] == f"train[{order[r]}]".encode()
      assert np.all(batch["image"][r] == 0) and np.all(batch["label"][r] == 255)
    else:
      assert batch[pipeline.REASON_KEY][r] == b""
      np.testing.assert_array_equal(batch["image"][r], clean["image"][r])
      np.testing.assert_array_equal(batch["label"][r], clean["label"][r])
  reasons = {int(order[r]): batch[pipeline.REASON_KEY][r].decode() for r in flagged}
  assert reasons[1].startswith("the image cannot be decoded")
  assert reasons[4].startswith("the label map cannot be decoded")
  assert reasons[6] == "the image is 64x64 but its label map 32x32"
  # Through the device prefetcher (ids and reasons stay on the host) into the metrics window.
  mesh = sharding_lib.make_mesh(-1, 1)
  prefetch = input_pipeline.DevicePrefetcher(
      iter([batch]), sharding_lib.batch_sharding(mesh), prefetch=1)
  item = next(prefetch)
  prefetch.close()
  host = item[input_pipeline.DevicePrefetcher.HOST]
  assert pipeline.ID_KEY not in item and int(np.sum(np.asarray(item[pipeline.BAD_KEY]))) == 3
  window = metrics.MetricsWindow(writer=None, total_steps=1, batch_size=8, start_step=0)
  with caplog.at_level("WARNING"):
    window.note_bad_examples(1, host)
    window.note_bad_examples(2, host)                # logged once per record
  lines = [r.getMessage() for r in caplog.records if "cannot be decoded" in r.getMessage()]
  assert len(lines) == 3 and any("example train[6]" in m and "32x32" in m for m in lines)
  # Evaluation: the bad ones are logged and scored nowhere; the others are as without them.
  caplog.clear()
  ev_kw = dict(global_batch_size=8, process_index=0, process_count=1, scale=(64, 64),
               canvas=(64, 64), reduce_zero=False)
  with caplog.at_level("WARNING"):
    ev = seg_data.EvalBatches(examples, split="test", **ev_kw)
  ev_clean = seg_data.EvalBatches(good, split="test", **ev_kw)
  assert [b[0] for b in ev.bad] == ["test[1]", "test[4]", "test[6]"]
  assert sum("left out of the scores" in r.getMessage() for r in caplog.records) == 3
  (b,), (c,) = list(ev), list(ev_clean)
  for r in range(8):
    if r in (1, 4, 6):
      assert np.all(b["label"][r] == 255)
    else:
      np.testing.assert_array_equal(b["label"][r], c["label"][r])
      np.testing.assert_array_equal(b["image"][r], c["image"][r])


@pytest.mark.parametrize("field,value,match", [
    ("num_classes", 12, "num_classes=12 does not match"),
    ("mask_key", "segmentation", "no per-pixel label map 'segmentation'"),
    ("model", "convvit_vitdet_tiny", "not a segmentation backbone"),
    ("crop_size", 40, "nearest accepted"),
    ("eval_canvas", (48, 64), "smaller than the crop"),
    ("eval_mode", "whole", None),
])
def test_config_errors_before_compute(tmp_path, field, value, match):
  c = _tiny(**{field: value})
  if field == "eval_mode":
    c.eval_canvas = (64, 96)
    match = "must equal"
  with pytest.raises(ConfigError, match=match):
    trainer.train_and_evaluate(c, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "checkpoints").exists()            # nothing was written


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """An uninterrupted float32 run of 3 steps: (its workdir, its result)."""
  workdir = tmp_path_factory.mktemp("full")
  return workdir, trainer.train_and_evaluate(_tiny(), str(workdir))


def test_train_reports_miou_and_resume_equals_uninterrupted(tmp_path, full_run):
  full_dir, full = full_run
  assert full.step == 3 and sorted(full.losses) == [1, 2, 3]
  scores = full.metrics[3]
  assert 0.0 <= scores["eval_mIoU"] <= 100.0 and 0.0 <= scores["eval_aAcc"] <= 100.0
  per_class = json.loads((full_dir / "eval" / "step_000003.json").read_text())
  assert per_class["mIoU"] == pytest.approx(scores["eval_mIoU"])
  assert set(per_class["per_class"]) == set(demo_segments.CLASS_NAMES)
  assert (full_dir / "best").exists()

  part = _tiny(stop_after_steps=2)
  first = trainer.train_and_evaluate(part, str(tmp_path / "resumed"))
  assert first.step == 2
  second = trainer.train_and_evaluate(_tiny(), str(tmp_path / "resumed"))
  assert second.step == 3
  assert first.losses[1] == full.losses[1] and first.losses[2] == full.losses[2]
  assert second.losses[3] == full.losses[3]
  assert second.metrics[3]["eval_mIoU"] == scores["eval_mIoU"]
  # Every array of the model state (parameters, BatchNorm statistics; RNG keys as their data).
  as_data = lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x
  a = [as_data(x) for x in jax.tree.leaves(nnx.state(full.model))]
  b = [as_data(x) for x in jax.tree.leaves(nnx.state(second.model))]
  assert len(a) == len(b) > 0
  assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_eigen_products_follow_the_default_run(tmp_path, full_run, caplog):
  # config.cpu_matmuls="eigen": the step and the sliding-window evaluation compiled with XLA's own
  # matrix products instead of YNNPACK's (what "auto" picks for a Base evaluation): the same
  # function, sums reordered.
  _, full = full_run
  with caplog.at_level("INFO"):
    run = trainer.train_and_evaluate(_tiny(cpu_matmuls="eigen"), str(tmp_path / "eigen"))
  if jax.default_backend() == "cpu" and "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    assert "Training step: matrix products on CPU: Eigen" in caplog.text
    assert "Evaluation: matrix products on CPU: Eigen" in caplog.text
  assert run.step == 3
  for s in (1, 2, 3):
    assert run.losses[s] == pytest.approx(full.losses[s], rel=1e-4)
  assert run.metrics[3]["eval_mIoU"] == pytest.approx(full.metrics[3]["eval_mIoU"], abs=1.0)


def test_bfloat16_with_remat_follows_the_float32_run(tmp_path, full_run):
  # The recipe's options: bfloat16 compute (params, BatchNorm statistics and the loss stay float32)
  # and rematerialised backbone blocks. Two steps from the same initialisation and data: the
  # losses are those of the float32 run to bfloat16's precision.
  _, full = full_run
  run = trainer.train_and_evaluate(_tiny(dtype="bfloat16", remat=True, stop_after_steps=2),
                                   str(tmp_path / "bf16"))
  assert run.step == 2 and sorted(run.losses) == [1, 2]
  for s in (1, 2):
    assert np.isfinite(run.losses[s])
    assert run.losses[s] == pytest.approx(full.losses[s], rel=2e-2), s
  assert run.losses[1] != full.losses[1]                     # bfloat16 did run
  # The stop evaluates (remat=True failed there once: nnx.remat inside the sliding-window scan).
  assert 0.0 <= run.metrics[2]["eval_mIoU"] <= 100.0
  dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(run.model, nnx.Param))}
  assert dtypes == {np.dtype("float32")}
