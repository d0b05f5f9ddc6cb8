"""Faults: a non-finite loss (stop: exit 3 with the step and a finite last checkpoint; skip: exactly
the bad step changes nothing and the run goes on), and resuming a workdir with a config that does
not fit its checkpoint (refused before compute, unless the change is allowed)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from convmae_jax import checkpoints, configs
from convmae_jax.train import ConfigError, input_pipeline, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(**overrides):
  c = configs.get_config("pretrain", "tiny")
  base = dict(dataset="imagenet2012", eval_split="validation", image_size=32, batch_size=8,
              num_train_steps=4, warmup_steps=1, blr=0.05, dtype="float32", log_every_steps=1,
              checkpoint_every_steps=1, keep_checkpoints=10, recon_every_steps=0, recon_at_end=False,
              async_checkpointing=False)
  for key, value in {**base, **overrides}.items():
    c[key] = value
  return c


def run(workdir, **overrides):
  with tfds.testing.mock_data(num_examples=16):
    return trainer.train_and_evaluate(make_config(**overrides), str(workdir))


def _params(workdir, step):
  """The saved model arrays of ``step`` (RNG keys left out) as numpy."""
  pure, _ = checkpoints.load_model_state(workdir, step=step)
  return [np.asarray(x) for x in jax.tree.leaves(pure)
          if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]


def test_skip_leaves_exactly_the_bad_step_out(tmp_path, monkeypatch):
  original = input_pipeline.DevicePrefetcher.__next__
  calls = {"n": 0}

  def poisoned(self):
    batch = original(self)
    calls["n"] += 1
    if calls["n"] == 3:                              # the batch of step 3
      batch = dict(batch, image=batch["image"] * np.nan)
    return batch

  monkeypatch.setattr(input_pipeline.DevicePrefetcher, "__next__", poisoned)
  result = run(tmp_path, nonfinite="skip")
  assert result.step == 4 and result.skipped_steps == [3]
  assert np.isfinite(result.losses[4]) and np.isnan(result.losses[3])
  p2, p3, p4 = (_params(tmp_path, s) for s in (2, 3, 4))
  for a, b in zip(p2, p3):                         # step 3 changed nothing
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(p3, p4))   # step 4 trained again
  assert all(np.all(np.isfinite(np.asarray(x))) for x in p4 if np.asarray(x).dtype.kind == "f")


def test_skip_stops_after_too_many_consecutive_bad_steps(tmp_path):
  # An lr of 1e36 makes every loss after the first update non-finite.
  with pytest.raises(FloatingPointError, match="3 consecutive steps up to step 4"):
    run(tmp_path, nonfinite="skip", max_consecutive_skips=2, blr=1e36, warmup_steps=0,
        num_train_steps=6)
  for step in checkpoints.create_manager(tmp_path, read_only=True).all_steps():
    assert all(np.all(np.isfinite(np.asarray(x))) for x in _params(tmp_path, step)
               if np.asarray(x).dtype.kind == "f")


def test_stop_exits_3_naming_the_step_and_a_finite_checkpoint(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "main.py"), "--config=" + os.path.join(ROOT, "configs", "demo.py"),
       f"--workdir={tmp_path}", "--config.blr=1e36", "--config.warmup_steps=0",
       "--config.num_train_steps=5", "--config.checkpoint_every_steps=1", "--config.log_every_steps=1",
       "--config.recon_every_steps=0", "--config.recon_at_end=False", "--config.batch_size=8",
       "--config.image_size=32"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert "error: Loss is" in proc.stderr and "at step" in proc.stderr
  last = checkpoints.latest_step(tmp_path)
  assert f"The last checkpoint is step {last} in" in proc.stderr
  assert all(np.all(np.isfinite(np.asarray(x))) for x in _params(tmp_path, last)
             if np.asarray(x).dtype.kind == "f")


def test_resume_with_a_config_that_does_not_fit_is_refused(tmp_path):
  run(tmp_path, num_train_steps=2, stop_after_steps=1)
  with pytest.raises(ConfigError, match=r"batch_size=8 \(now 16\).*allow_resume_changes"):
    run(tmp_path, num_train_steps=2, batch_size=16)
  wider = make_config(num_train_steps=2, allow_resume_changes=True)
  wider.model_kwargs.embed_dims = (32, 48, 96)
  with pytest.raises(ConfigError, match=r"embed_dims=\[32, 48, 64\] \(now \[32, 48, 96\]\)"):
    with tfds.testing.mock_data(num_examples=16):
      trainer.train_and_evaluate(wider, str(tmp_path))
  assert checkpoints.latest_step(tmp_path) == 1           # nothing was written by the refusals
  result = run(tmp_path, num_train_steps=2, seed=5, allow_resume_changes=True)
  assert result.step == 2


def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_resumes(tmp_path, caplog):
  reference = run(tmp_path / "reference")
  run(tmp_path / "run", stop_after_steps=3)
  step3 = tmp_path / "run" / "checkpoints" / "3"
  files = [os.path.join(d, f) for d, _, fs in os.walk(step3 / "model") for f in fs]
  victim = max(files, key=os.path.getsize)         # the largest array chunk: cut it in half
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  with caplog.at_level("WARNING"):
    resumed = run(tmp_path / "run")
  assert "The checkpoint of step 3" in caplog.text and "cannot be read" in caplog.text
  assert (tmp_path / "run" / "checkpoints" / "3.damaged").is_dir()     # kept, not deleted
  assert sorted(resumed.losses) == [3, 4]                               # resumed from step 2
  for s in (3, 4):
    assert resumed.losses[s] == reference.losses[s], s
  assert checkpoints.latest_step(tmp_path / "run") == 4


def test_keep_period_keeps_old_steps_for_good(tmp_path):
  run(tmp_path, num_train_steps=6, keep_checkpoints=2, keep_period=3)
  steps = checkpoints.create_manager(tmp_path, read_only=True).all_steps()
  assert sorted(steps) == [3, 5, 6]
