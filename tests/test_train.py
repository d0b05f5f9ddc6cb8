"""The pretraining loop on a tiny ConvMAE with TFDS mock ImageNet (CPU).

One step; 1 device vs 8 virtual devices (data 4 x fsdp 2); stop and resume; NaN stop.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from convmae_jax import checkpoints, models
from convmae_jax.configs import pretrain as pretrain_config
from convmae_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


NUM_STEPS = 4
MOCK_EXAMPLES = 16

# A tiny ConvMAE on 32 px images (2x2 tokens of 16 px), 8 images per step.
TINY = {
    "dataset": "imagenet2012", "eval_split": "validation", "image_size": 32, "batch_size": 8,
    "num_train_steps": NUM_STEPS, "warmup_steps": 2, "blr": 0.05, "dtype": "float32",
    "log_every_steps": 1, "checkpoint_every_steps": 100, "recon_every_steps": 0,
    "recon_at_end": False, "mesh.data": -1, "mesh.fsdp": 1, "keep_checkpoints": 3,
}


def make_config(**overrides):
  c = pretrain_config.get_config("tiny")
  for key, value in {**TINY, **overrides}.items():
    if key not in c and "." not in key:
      with c.unlocked():
        c[key] = value
      continue
    node, leaf = c, key
    while "." in leaf:
      head, leaf = leaf.split(".", 1)
      node = node[head]
    node[leaf] = value
  return c


def run(workdir, **overrides):
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    return trainer.train_and_evaluate(make_config(**overrides), str(workdir))


_SUBPROCESS = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import jax
    assert jax.device_count() == {devices}, jax.devices()
    import test_train
    result = test_train.run({workdir!r}, **json.loads({overrides!r}))
    print("LOSSES=" + json.dumps({{str(k): v for k, v in result.losses.items()}}))
    kernel = result.model.blocks3[0].attn.qkv.kernel[...]
    print("SPEC=" + str(tuple(kernel.sharding.spec)) + " DEVICES=" + str(len(kernel.sharding.device_set)))
""")


def run_in_subprocess(workdir, devices, **overrides):
  """Runs :func:`run` in a fresh process with ``devices`` virtual CPU devices.

  Returns the losses and a line describing the sharding of one trained kernel.
  """
  flags = f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={devices}'
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  code = _SUBPROCESS.format(root=ROOT, tests=os.path.join(ROOT, "tests"), devices=devices,
                            workdir=str(workdir), overrides=json.dumps(overrides))
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("LOSSES=")][-1]
  spec = [l for l in proc.stdout.splitlines() if l.startswith("SPEC=")][-1]
  return {int(k): v for k, v in json.loads(line[len("LOSSES="):]).items()}, spec


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Uninterrupted NUM_STEPS-step run on one device: {step: loss}."""
  workdir = tmp_path_factory.mktemp("reference")
  if jax.device_count() == 1:
    losses = run(workdir).losses
  else:
    losses, _ = run_in_subprocess(workdir, 1)
  assert sorted(losses) == list(range(1, NUM_STEPS + 1))
  return losses


def test_one_step_on_mock_imagenet(tmp_path):
  # warmup_steps=0: the first update runs at the peak lr (with warmup it is 0, as official).
  result = run(tmp_path, num_train_steps=1, warmup_steps=0, recon_at_end=True, recon_num_images=2)
  assert result.step == 1 and list(result.losses) == [1]
  loss = result.losses[1]
  assert np.isfinite(loss) and 0.2 < loss < 5.0           # normalized-pixel MSE starts near 1

  # Parameters moved away from the initialisation (same seed and overrides as the trainer).
  init = models.create("convmae_tiny", rngs=nnx.Rngs(0), img_size=32)
  before = jax.tree.leaves(nnx.state(init, nnx.Param))
  after = jax.tree.leaves(nnx.state(result.model, nnx.Param))
  changed = [not np.allclose(a, b) for a, b in zip(before, after)]
  assert sum(changed) >= 0.9 * len(changed), f"{sum(changed)}/{len(changed)} params changed"
  # Frozen position embeddings did not.
  np.testing.assert_array_equal(init.pos_embed[...], result.model.pos_embed[...])

  # A checkpoint at step 1 in the contract layout, loadable by name + kwargs (what interop does).
  pure, meta = checkpoints.load_model_state(tmp_path)
  assert meta["step"] == 1 and meta["model_name"] == "convmae_tiny"
  assert meta["model_kwargs"]["img_size"] == 32 and meta["data_position"] == 1
  assert sorted(pure["blocks3"]) == [0, 1]
  fresh = models.create(meta["model_name"], rngs=nnx.Rngs(1), **meta["model_kwargs"])
  checkpoints.load_into(tmp_path, fresh)
  np.testing.assert_array_equal(fresh.mask_token[...], result.model.mask_token[...])
  assert {"meta", "model", "opt_state"} <= set(os.listdir(tmp_path / "checkpoints" / "1"))

  # Reconstruction figure and TensorBoard events.
  assert os.path.isfile(tmp_path / "reconstructions" / "step_000001.png")
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def test_one_device_and_eight_devices_agree(tmp_path, reference):
  losses, spec = run_in_subprocess(tmp_path / "mesh", 8, **{"mesh.data": 4, "mesh.fsdp": 2})
  # The (64, 192) qkv kernel is split in two along its larger dim over fsdp, on all 8 devices.
  assert spec == "SPEC=(None, 'fsdp') DEVICES=8", spec
  assert sorted(losses) == sorted(reference)
  got = np.array([losses[s] for s in sorted(reference)])
  want = np.array([reference[s] for s in sorted(reference)])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert want[-1] < want[0]                     # the tiny model learns on mock data too


def test_stop_and_resume_repeats_the_uninterrupted_run(tmp_path, reference):
  first = run(tmp_path, stop_after_steps=2)
  assert first.step == 2 and sorted(first.losses) == [1, 2]
  assert checkpoints.latest_step(tmp_path) == 2
  second = run(tmp_path)                        # same workdir: resumes at step 2
  assert second.step == NUM_STEPS and sorted(second.losses) == [3, 4]
  losses = {**first.losses, **second.losses}
  for step in range(1, NUM_STEPS + 1):
    assert losses[step] == pytest.approx(reference[step], rel=1e-6, abs=0), step
  assert checkpoints.latest_step(tmp_path) == NUM_STEPS
  third = run(tmp_path)                         # finished: nothing left to do
  assert third.step == NUM_STEPS and third.losses == {}


def test_gradient_accumulation_matches_the_full_batch(tmp_path, reference):
  result = run(tmp_path, grad_accum_steps=2, num_train_steps=NUM_STEPS, stop_after_steps=2)
  for step in (1, 2):
    assert result.losses[step] == pytest.approx(reference[step], rel=1e-5), step


def test_non_finite_loss_stops_loudly_with_the_step(tmp_path):
  with pytest.raises(FloatingPointError, match=r"Loss is (nan|inf) at step \d") as info:
    run(tmp_path, blr=1e36, warmup_steps=0, num_train_steps=3, checkpoint_every_steps=1)
  last = checkpoints.latest_step(tmp_path)
  assert last is not None and f"The last checkpoint is step {last} in" in str(info.value)


def test_init_from_a_model_only_checkpoint(tmp_path):
  source = models.create("convmae_tiny", rngs=nnx.Rngs(7), img_size=32)
  checkpoints.save_model(tmp_path / "imported", source,
                         {"model_name": "convmae_tiny", "model_kwargs": {"img_size": 32}})
  # warmup_steps=1: the single update runs at lr 0, so the weights stay those of the checkpoint.
  result = run(tmp_path / "run", init_from=str(tmp_path / "imported"), num_train_steps=1,
               warmup_steps=1)
  for a, b in zip(jax.tree.leaves(nnx.state(source, nnx.Param)),
                  jax.tree.leaves(nnx.state(result.model, nnx.Param))):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="init_from=.*holds no checkpoint"):
    run(tmp_path / "run2", init_from=str(tmp_path / "nothing"))


_SIGTERM_WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import logging
    from absl import logging as absl_logging
    logging.basicConfig(level=logging.INFO)      # progress lines on stderr, as under main.py
    absl_logging.set_verbosity("info")
    import test_train
    result = test_train.run({workdir!r}, num_train_steps=100000, checkpoint_every_steps=10**6)
    print("STOPPED_BY=%s STEP=%d" % (result.stopped_by, result.step), flush=True)
""")


def test_sigterm_checkpoints_and_stops(tmp_path):
  """A preempted run (SIGTERM) finishes its step, writes a checkpoint there and exits cleanly."""
  import signal as signal_lib
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=1").strip())
  code = _SIGTERM_WORKER.format(root=ROOT, tests=os.path.join(ROOT, "tests"), workdir=str(tmp_path))
  proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  import threading
  watchdog = threading.Timer(240, proc.kill)     # never wait for 100000 steps if the line is missed
  watchdog.start()
  try:
    for line in proc.stderr:                     # absl logs the progress line to stderr
      if "step 3/100000" in line:
        proc.send_signal(signal_lib.SIGTERM)
        break
    out, err = proc.communicate(timeout=300)
  finally:
    watchdog.cancel()
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-3000:]
  stopped = [l for l in out.splitlines() if l.startswith("STOPPED_BY=")][-1]
  step = int(stopped.split("STEP=")[1])
  assert stopped.startswith("STOPPED_BY=SIGTERM") and 3 <= step < 100000
  assert checkpoints.latest_step(tmp_path) == step   # the only checkpoint: the one at the stop
  assert "run the same command again to resume" in err


def test_console_files_and_profile_trace(tmp_path):
  """parameters.txt and config.json in the workdir; profile_steps=(1, 2) writes a trace of step 2."""
  run(tmp_path, num_train_steps=2, warmup_steps=1, profile_steps=(1, 2))
  table = (tmp_path / "parameters.txt").read_text()
  assert table.startswith("convmae_tiny ") and "blocks3/0/attn/qkv/kernel" in table
  n = sum(x.size for x in jax.tree.leaves(nnx.state(
      models.create("convmae_tiny", rngs=nnx.Rngs(0), img_size=32), nnx.Param)))
  assert f"{n:,} trainable parameters" in table
  assert json.loads((tmp_path / "config.json").read_text())["image_size"] == 32
  traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files]
  assert any(f.endswith(".xplane.pb") for f in traces), traces
