"""Fine-tuning, linear probing and evaluation on the embedded digits (CPU, tiny ConvViT, 32 px).

The shared core's per-step random streams; the labelled pipeline (resume, padded evaluation);
the trainer: resume equals the uninterrupted run, a short fine-tune learns the digits, the linear
probe trains the head only, evaluation of the best checkpoint, PyTorch-twin parity of a
fine-tuning run started from an exported .safetensors file; refusals before compute.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convmae_jax import checkpoints, models
from convmae_jax.configs import finetune as finetune_config
from convmae_jax.configs import linprobe as linprobe_config
from convmae_jax.data import classification as cls_data
from convmae_jax.train import ConfigError, sharding as sharding_lib, step as step_lib, trainer

DIGITS = "convmae_demo_digits"
NUM_TEST = 360


@pytest.fixture(scope="module", autouse=True)
def env(tmp_path_factory):
  """One TFDS data_dir for the module."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  old_env = os.environ.get("TFDS_DATA_DIR")
  os.environ["TFDS_DATA_DIR"] = data_dir
  yield data_dir
  if old_env is None:
    os.environ.pop("TFDS_DATA_DIR", None)
  else:
    os.environ["TFDS_DATA_DIR"] = old_env


def make_config(job="finetune", **overrides):
  c = (linprobe_config if job == "linprobe" else finetune_config).get_config("tiny")
  base = dict(dataset=DIGITS, eval_split="test", num_classes=10, image_size=32, dtype="float32",
              batch_size=32, eval_batch_size=120, num_train_steps=6, warmup_steps=2,
              log_every_steps=1, checkpoint_every_steps=100, eval_every_steps=3,
              eval_num_examples=120, rand_augment="rand-m9-mstd0.5-inc1", crop_scale=(0.35, 1.0))
  if job == "linprobe":
    base.update(rand_augment="", global_pool=True, blr=0.8)
  for key, value in {**base, "job": job, **overrides}.items():
    c[key] = value
  return c


def run(workdir, job="finetune", **overrides):
  return trainer.train_and_evaluate(make_config(job, **overrides), str(workdir))


# ------------------------------------------------------------------------------------------------
# Configs.

def test_finetune_linprobe_evaluate_configs_are_the_official_recipes():
  from convmae_jax.configs import evaluate as evaluate_config
  from convmae_jax.train import validation
  ft, lin, ev = finetune_config.get_config(), linprobe_config.get_config(), evaluate_config.get_config()
  assert (ft.job, ft.model, ft.batch_size, ft.num_epochs, ft.warmup_epochs) == (
      "finetune", "convvit_base", 1024, 100, 5)
  assert (ft.blr, ft.min_lr, ft.weight_decay, ft.layer_decay, ft.b1, ft.b2) == (
      5e-4, 1e-6, 0.05, 0.65, 0.9, 0.999)
  assert (ft.drop_path_rate, ft.mixup, ft.cutmix, ft.mixup_switch_prob, ft.label_smoothing) == (
      0.1, 0.8, 1.0, 0.5, 0.1)
  assert (ft.rand_augment, ft.reprob, tuple(ft.crop_scale), ft.crop_pct, ft.head_init_std) == (
      "rand-m9-mstd0.5-inc1", 0.25, (0.08, 1.0), 0.875, 2e-5)
  assert (lin.job, lin.batch_size, lin.num_epochs, lin.warmup_epochs, lin.blr, lin.weight_decay) == (
      "linprobe", 4096, 90, 10, 0.1, 0.0)
  assert (lin.global_pool, lin.head_init_std, lin.mixup_prob, lin.drop_path_rate) == (False, 0.01, 0.0, 0.0)
  assert ev.job == "evaluate"
  for cfg in (ft, lin, ev):
    plan = validation.validate_classification_config(cfg, num_devices=1, process_count=1)
    assert plan.model_config.num_classes == 1000 and plan.model_config.img_size == 224
  assert validation.validate_classification_config(lin, num_devices=1, process_count=1
                                                   ).model_config.head_batchnorm
  with pytest.raises(ConfigError, match="rand_augment='rand-x9'"):
    bad = finetune_config.get_config()
    bad.rand_augment = "rand-x9"
    validation.validate_classification_config(bad, num_devices=1, process_count=1)


# ------------------------------------------------------------------------------------------------
# The core: drop path draws new masks every step, the same ones when a step is repeated.

def test_drop_path_masks_change_per_step_and_repeat_on_resume():
  model = models.create("convvit_tiny", rngs=nnx.Rngs(0), img_size=32, num_classes=10,
                        drop_path_rate=0.5)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  mesh = sharding_lib.make_mesh(-1, 1)
  tx = __import__("optax").sgd(0.0)                   # lr 0: only drop path changes the outputs
  sh = sharding_lib.state_shardings(mesh, params, rest, tx)
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))

  def loss_fn(m, batch):
    out = m(batch["image"])
    return jnp.mean(out), {"probe": jnp.sum(out * jnp.arange(out.size).reshape(out.shape))}

  def make_step():
    return step_lib.build_train_step(graphdef=graphdef, param_filter=nnx.Param, loss_fn=loss_fn, tx=tx,
                                 schedule=lambda s: 0.0, shardings=sh, batch_size=4, seed=0)

  def probes(steps):
    p, r = jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, rest)
    opt = tx.init(p)
    step_fn, out = make_step(), {}
    for s in steps:
      p, opt, r, m = step_fn(p, opt, r, {"image": images}, np.int32(s))
      out[s] = float(m["probe"])
    return out

  first = probes([0, 1, 2])
  assert len({first[0], first[1], first[2]}) == 3         # new masks at every step
  resumed = probes([1, 2])                                 # a run resumed at step 1, fresh state
  assert resumed[1] == first[1] and resumed[2] == first[2]
  model.eval()
  det = float(loss_fn(model, {"image": images})[1]["probe"])
  assert all(abs(v - det) > 1e-6 for v in first.values())  # drop path was active


# ------------------------------------------------------------------------------------------------
# Labelled pipeline.

def test_labelled_stream_resumes_and_evaluation_counts_every_example_once(env):
  kw = dict(split="train", global_batch_size=16, image_size=32, seed=3, process_index=0,
            process_count=1, rand_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
  full = cls_data.create_train_dataset(DIGITS, **kw)
  batches = [next(full) for _ in range(4)]
  resumed = cls_data.create_train_dataset(DIGITS, start_step=2, **kw)
  for want in batches[2:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
  assert batches[0]["image"].shape == (16, 32, 32, 3) and batches[0]["label"].dtype == np.int32
  assert set(np.concatenate([b["label"] for b in batches])) <= set(range(10))

  # Two processes: the same number of batches, every test example exactly once.
  parts = [cls_data.create_eval_dataset(DIGITS, split="test", global_batch_size=28, image_size=32,
                                        process_index=i, process_count=2) for i in range(2)]
  assert parts[0].num_batches == parts[1].num_batches == int(np.ceil(NUM_TEST / 2 / 14))
  valid = sum(float(np.sum(b["valid"])) for p in parts for b in p)
  assert valid == NUM_TEST
  rows = [b for p in parts for b in p]
  assert all(b["image"].shape == (14, 32, 32, 3) for b in rows)
  # The padding rows are zero images with weight 0.
  last = rows[-1]
  assert np.all(last["image"][last["valid"] == 0] == 0)


def test_labelled_stream_without_flip_keeps_the_crops_unmirrored(env):
  """hflip=False (the digits demos): each image is the flipped stream's one or its mirror."""
  kw = dict(split="train", global_batch_size=16, image_size=32, seed=3, process_index=0,
            process_count=1, recipe="linprobe")
  a, b = (cls_data.create_train_dataset(DIGITS, hflip=flip, **kw) for flip in (True, False))
  flipped = np.concatenate([next(a)["image"] for _ in range(3)])
  plain = np.concatenate([next(b)["image"] for _ in range(3)])
  mirrored = np.array([np.array_equal(x[:, ::-1], y) and not np.array_equal(x, y)
                       for x, y in zip(flipped, plain)])
  same = np.array([np.array_equal(x, y) for x, y in zip(flipped, plain)])
  assert np.all(same | mirrored) and 12 <= mirrored.sum() <= 36, (same.sum(), mirrored.sum())


def test_label_info_refuses_a_dataset_without_labels(env, monkeypatch):
  import tensorflow_datasets as tfds

  class FakeInfo:
    features = {"image": tfds.features.Image(shape=(None, None, 3))}

  class FakeBuilder:
    info = FakeInfo()

  monkeypatch.setattr(cls_data.pipeline, "check_dataset", lambda *a, **k: FakeBuilder())
  with pytest.raises(ValueError, match="has no 'label' ClassLabel feature.*features: \\['image'\\]"):
    cls_data.label_info("unlabelled_images")


# ------------------------------------------------------------------------------------------------
# The trainer.

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 6-step fine-tuning run from random init with eval at steps 3 and 6."""
  workdir = tmp_path_factory.mktemp("ft_reference")
  return workdir, run(workdir)


def test_finetune_resume_repeats_the_uninterrupted_run(tmp_path, reference):
  _, ref = reference
  assert sorted(ref.losses) == list(range(1, 7)) and sorted(ref.metrics) == [3, 6]
  first = run(tmp_path, stop_after_steps=4)
  assert first.step == 4 and checkpoints.latest_step(tmp_path) == 4
  second = run(tmp_path)
  losses = {**first.losses, **second.losses}
  for s in range(1, 7):
    assert losses[s] == ref.losses[s], s                  # bit for bit
  assert second.metrics[6] == ref.metrics[6]
  for a, b in zip(jax.tree.leaves(nnx.state(ref.model, nnx.Param)),
                  jax.tree.leaves(nnx.state(second.model, nnx.Param))):
    np.testing.assert_array_equal(a, b)


def test_evaluate_job_on_the_best_checkpoint(tmp_path, reference):
  workdir, ref = reference
  best = max(ref.metrics, key=lambda s: (ref.metrics[s]["top1"], -s))
  result = trainer.train_and_evaluate(
      make_config("evaluate", init_from=str(workdir / "best")), str(tmp_path))
  got = json.loads((tmp_path / "eval_test.json").read_text())
  assert got["num_examples"] == 120
  assert got["top1"] == pytest.approx(ref.metrics[best]["top1"], abs=1e-9)
  assert got["top5"] == pytest.approx(ref.metrics[best]["top5"], abs=1e-9)
  assert got["loss"] == pytest.approx(ref.metrics[best]["loss"], rel=1e-5)
  assert result.metrics[0]["top1"] == got["top1"]


def test_short_finetune_learns_the_digits(tmp_path):
  """From random init, 150 steps at 32 px: far above the 10% of chance on the 360 test digits."""
  result = run(tmp_path, num_train_steps=150, warmup_steps=15, blr=8e-3, layer_decay=1.0,
               drop_path_rate=0.0, mixup_prob=0.0, reprob=0.0, rand_augment="",
               label_smoothing=0.0, eval_every_steps=-1, eval_num_examples=-1, log_every_steps=50,
               batch_size=64)
  final = result.metrics[150]
  assert final["num_examples"] == NUM_TEST
  assert final["top1"] >= 75.0, final


def test_linear_probe_trains_the_head_only(tmp_path, caplog):
  encoder = models.create("convmae_tiny", rngs=nnx.Rngs(5), img_size=32)
  checkpoints.save_model(tmp_path / "pre", encoder,
                         {"model_name": "convmae_tiny", "model_kwargs": encoder.config.to_dict()})
  # cpu_matmuls="eigen": the step and the evaluation compiled with XLA:CPU's own matrix products
  # (what "auto" picks for a large linear probe), unless XLA_FLAGS sets the library.
  with caplog.at_level("INFO"):
    result = run(tmp_path / "lin", job="linprobe", init_from=str(tmp_path / "pre"),
                 cpu_matmuls="eigen")
  if jax.default_backend() == "cpu" and "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    assert "Training step: matrix products on CPU: Eigen" in caplog.text
    assert "Evaluation: matrix products on CPU: Eigen" in caplog.text
  model = result.model
  # The encoder equals the checkpoint; the head moved; BatchNorm statistics were updated.
  np.testing.assert_array_equal(model.blocks3[0].attn.qkv.kernel[...],
                                encoder.blocks3[0].attn.qkv.kernel[...])
  np.testing.assert_array_equal(model.patch_embed1.proj.kernel[...],
                                encoder.patch_embed1.proj.kernel[...])
  assert float(jnp.std(model.head.kernel[...])) > 0.005          # N(0, 0.01) init, then trained
  assert not np.allclose(model.head_bn.mean[...], 0.0)
  assert model.head_bn.use_running_average                       # returned in eval mode
  assert np.isfinite(result.losses[6])


def test_finetune_from_a_pytorch_twin_export_matches_the_twin(tmp_path):
  """The twin's pretraining weights as .safetensors -> fine-tuning init -> our eval logits after a
  zero-lr step equal the twin classifier's with the same encoder and head."""
  torch = pytest.importorskip("torch")
  from safetensors.numpy import save_file
  from convmae_jax import interop

  torch.manual_seed(0)
  twin = interop.torch_model("convmae_tiny", img_size=32)
  sd = {k: v.detach().numpy().copy() for k, v in twin.state_dict().items()}
  save_file(sd, str(tmp_path / "twin.safetensors"))
  # warmup_steps=1: the single update runs at lr 0, so the weights stay those loaded.
  result = run(tmp_path / "ft", init_from=str(tmp_path / "twin.safetensors"), num_train_steps=1,
               warmup_steps=1, head_init_std=0.0, eval_every_steps=-1)
  ours = result.model
  clf = interop.torch_model("convvit_tiny", img_size=32, num_classes=10, drop_path_rate=0.1)
  mine = interop.to_torch_state_dict(ours)
  clf.load_state_dict({k: torch.from_numpy(v) for k, v in mine.items()}, strict=True)
  # The encoder in our model is the twin's (head and fc_norm are ours, copied above).
  for k in ("blocks3.0.attn.qkv.weight", "patch_embed1.proj.weight", "pos_embed"):
    np.testing.assert_array_equal(mine[k], sd[k])
  clf.eval()
  images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = clf(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  got = np.asarray(ours(jnp.asarray(images)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Refusals before compute.

def test_bad_inputs_are_refused_before_compute(tmp_path, reference):
  workdir, _ = reference
  # A classifier checkpoint where a pretraining one is expected.
  with pytest.raises(ConfigError, match="classifier .*checkpoint.*evaluate job"):
    run(tmp_path / "a", init_from=str(workdir / "best"))
  # A pretraining checkpoint where a classifier is expected.
  pre = models.create("convmae_tiny", rngs=nnx.Rngs(0), img_size=32)
  checkpoints.save_model(tmp_path / "pre", pre, {"model_name": "convmae_tiny",
                                                 "model_kwargs": pre.config.to_dict()})
  with pytest.raises(ConfigError, match="no classifier head"):
    trainer.train_and_evaluate(make_config("evaluate", init_from=str(tmp_path / "pre")),
                               str(tmp_path / "b"))
  # num_classes that does not match the dataset.
  with pytest.raises(ConfigError, match="num_classes=7 does not match .* 10 classes"):
    run(tmp_path / "c", num_classes=7)
  # A position embedding that cannot be resized (another width).
  small = models.create("convmae_tiny", rngs=nnx.Rngs(0), img_size=32, embed_dims=(32, 48, 96),
                        num_heads=4)
  checkpoints.save_model(tmp_path / "wide", small, {"model_name": "convmae_tiny",
                                                    "model_kwargs": small.config.to_dict()})
  with pytest.raises(ConfigError, match="pos_embed of shape \\(1, 4, 96\\) cannot be resized"):
    run(tmp_path / "d", init_from=str(tmp_path / "wide"))
  # Mixup with an odd batch.
  with pytest.raises(ConfigError, match="batch_size=33 is odd"):
    run(tmp_path / "e", batch_size=33)
  # A matrix product library that does not exist.
  with pytest.raises(ConfigError, match="cpu_matmuls='mkl' is not accepted; use 'auto'"):
    run(tmp_path / "f", cpu_matmuls="mkl")
  # A host memory mode that does not exist.
  with pytest.raises(ConfigError, match="host_malloc='jemalloc' is not accepted; use 'auto'"):
    run(tmp_path / "g", host_malloc="jemalloc")
  # Nothing was written by any refused run.
  for name in "abcdefg":
    assert not (tmp_path / name / "checkpoints").exists()
