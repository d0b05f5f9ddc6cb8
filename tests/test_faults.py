"""Faults: a non-finite loss (exit 3 with the step and a finite last checkpoint; skip: exactly
the bad step changes nothing and the run goes on), resuming a workdir with a config that does
not fit its checkpoint (refused before compute, unless the change is allowed), undecodable records
(replaced in place, counted, logged once; too many stop the run with exit 4)."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import faulty_photos
from convmae_jax import checkpoints, configs, data
from convmae_jax.train import ConfigError, input_pipeline, trainer, validation

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


def test_non_finite_losses_exit_3_naming_the_step_and_a_finite_checkpoint(tmp_path):
  # An lr of 1e36 makes every loss after the first update non-finite. With nonfinite="rollback" and
  # max_rollbacks=1 the run rolls back to the checkpoint of step 1 once, then stops as "stop" does
  # (the same error and exit status; "stop" itself: tests/test_train.py).
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "main.py"), "--config=" + os.path.join(ROOT, "configs", "demo.py"),
       f"--workdir={tmp_path}", "--config.blr=1e36", "--config.warmup_steps=0",
       "--config.num_train_steps=5", "--config.checkpoint_every_steps=1", "--config.log_every_steps=1",
       "--config.recon_every_steps=0", "--config.recon_at_end=False", "--config.batch_size=8",
       "--config.image_size=32", "--config.nonfinite=rollback", "--config.max_rollbacks=1"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert "error: Loss is " in proc.stderr and " at step 2 " in proc.stderr
  assert proc.stderr.count("rolled back to the checkpoint of step 1") == 1
  assert "after 1 rollback in a row to the checkpoint of step 1" in proc.stderr
  last = checkpoints.latest_step(tmp_path)
  assert last == 1 and f"The last checkpoint is step {last} in" in proc.stderr
  assert all(np.all(np.isfinite(np.asarray(x))) for x in _params(tmp_path, last)
             if np.asarray(x).dtype.kind == "f")
  # Resuming this workdir with another model: one line, exit 2, and no checkpoint thread left to
  # print a traceback at interpreter shutdown.
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "main.py"), "--config=" + os.path.join(ROOT, "configs", "demo.py"),
       f"--workdir={tmp_path}", "--config.model=convmae_small"], cwd=tmp_path, env=env,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "was written with model 'convmae_tiny' (now 'convmae_small')" in proc.stderr
  assert "use another --workdir" in proc.stderr
  assert "Traceback" not in proc.stderr and "RuntimeError" not in proc.stderr, proc.stderr[-3000:]
  assert checkpoints.latest_step(tmp_path) == last


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


# ------------------------------------------------------------------------------- bad records


@pytest.fixture(scope="module")
def faulty_dir(tmp_path_factory):
  return faulty_photos.prepare(tmp_path_factory.mktemp("faulty_tfds"))


def run_faulty(workdir, data_dir, **overrides):
  config = make_config(dataset=faulty_photos.NAME, data_dir=data_dir, **overrides)
  return trainer.train_and_evaluate(config, str(workdir))


def test_undecodable_records_are_replaced_counted_and_resume_exactly(tmp_path, faulty_dir, caplog):
  # What the pipeline itself flags per step (4 steps of 8 = two epochs of the 16 records).
  it = data.create_pretrain_dataset(faulty_photos.NAME, split="train", global_batch_size=8,
                                    image_size=32, seed=0, data_dir=faulty_dir, process_index=0,
                                    process_count=1)
  batches = [next(it) for _ in range(4)]
  per_step = [int(b["bad"].sum()) for b in batches]
  assert sum(per_step) == 2 * faulty_photos.NUM_BAD              # every bad record, each epoch
  assert all(b["image"].shape == (8, 32, 32, 3) for b in batches)  # the batches keep their size
  for b in batches:                                               # replaced by the mean colour
    assert np.all(b["image"][b["bad"]] == 0.0) and np.all(b["image"][~b["bad"]].std(axis=(1, 2, 3)) > 0)
  flagged = {bytes(i) for b in batches for i in b["example_id"][b["bad"]]}
  assert len(flagged) == faulty_photos.NUM_BAD

  scalars = {}
  with caplog.at_level("WARNING"):
    config = make_config(dataset=faulty_photos.NAME, data_dir=faulty_dir, max_bad_fraction=0.5)
    reference = trainer.train_and_evaluate(config, str(tmp_path / "reference"),
                                           on_log=lambda s, m: scalars.__setitem__(s, m))
  assert reference.step == 4 and all(np.isfinite(v) for v in reference.losses.values())
  assert reference.bad_examples == sum(per_step)
  assert [scalars[s]["bad_examples"] for s in (1, 2, 3, 4)] == list(np.cumsum(per_step))
  logged = [r.getMessage() for r in caplog.records if "cannot be decoded" in r.getMessage()]
  assert len(logged) == faulty_photos.NUM_BAD                     # once per record, not per read
  assert {m.split("example ")[1].split(" ")[0].encode() for m in logged} == flagged
  assert sum("Unknown image file format" in m for m in logged) == len(faulty_photos.NOT_AN_IMAGE)
  assert sum("jpeg::Uncompress failed" in m for m in logged) == len(faulty_photos.TRUNCATED)

  # Stop just before a step that holds bad records, resume across it: the same losses.
  across = next(s for s in range(2, 5) if per_step[s - 1])
  run_faulty(tmp_path / "run", faulty_dir, max_bad_fraction=0.5, stop_after_steps=across - 1)
  resumed = run_faulty(tmp_path / "run", faulty_dir, max_bad_fraction=0.5)
  assert sorted(resumed.losses) == list(range(across, 5))
  for s in resumed.losses:
    assert resumed.losses[s] == reference.losses[s], s
  assert resumed.bad_examples == reference.bad_examples           # carried by the checkpoint
  for a, b in zip(_params(tmp_path / "reference", 4), _params(tmp_path / "run", 4)):
    np.testing.assert_array_equal(a, b)


def test_too_many_bad_records_stop_with_exit_4_naming_them(tmp_path, faulty_dir):
  for bad in (-0.1, 1.5):
    with pytest.raises(ConfigError, match=r"config.max_bad_fraction=.* expected a fraction in \[0, 1\]"):
      validation.validate_config(make_config(max_bad_fraction=bad))
  code = (f"import sys; sys.path[:0] = [{os.path.join(ROOT, 'tests')!r}, {ROOT!r}]\n"
          "import faulty_photos, main\n"
          "from absl import app\n"
          "main.check_command_line(sys.argv); app.run(main.main)\n")
  args = [f"--config={os.path.join(ROOT, 'configs', 'demo.py')}", f"--workdir={tmp_path / 'w'}",
          f"--config.dataset={faulty_photos.NAME}", f"--config.data_dir={faulty_dir}",
          "--config.max_bad_fraction=0.1", "--config.num_train_steps=6", "--config.batch_size=8",
          "--config.image_size=32", "--config.checkpoint_every_steps=5",
          "--config.log_every_steps=1", "--config.recon_every_steps=0", "--config.recon_at_end=False"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 4, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  # Checked after one epoch (16 examples = 2 steps): all 3 bad records are in it.
  assert (f"error: {faulty_photos.NUM_BAD} of the 16 examples read up to step 2 could not be "
          "decoded (18.750%, more than max_bad_fraction=0.1)") in proc.stderr
  names = proc.stderr.split("First ones (TFDS ids): ")[1].split(". Repair")[0].split(", ")
  assert len(names) == faulty_photos.NUM_BAD
  assert all(n.startswith("faulty_photos-train.") for n in names)
  assert "A checkpoint of step 2 is in" in proc.stderr
  assert checkpoints.latest_step(tmp_path / "w") == 2             # written at the stop


# ------------------------------------------------------------------- SIGKILL during an async save

_HELD_SAVE = """
import sys, time
sys.path[:0] = [{tests!r}, {root!r}]
from orbax.checkpoint._src.path import atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def held(self):
  # Step {held}: every array is written in its temporary folder; the commit waits, so the save is
  # still in flight when the test kills this process.
  if self._final_path.name == "{held}":
    print("IN_FLIGHT", self._tmp_path, flush=True)
    time.sleep(3600)
  return await finalize(self)

atomicity.AtomicRenameTemporaryPath.finalize = held
import test_faults
test_faults.run({workdir!r}, num_train_steps=6, checkpoint_every_steps=2, async_checkpointing=True)
"""


def test_sigkill_while_an_async_save_is_in_flight_loses_nothing(tmp_path):
  reference = run(tmp_path / "reference", num_train_steps=6, checkpoint_every_steps=2,
                  async_checkpointing=True)
  code = _HELD_SAVE.format(tests=os.path.join(ROOT, "tests"), root=ROOT, held=4,
                           workdir=str(tmp_path / "run"))
  proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    in_flight = None
    for line in proc.stdout:
      if line.startswith("IN_FLIGHT"):
        in_flight = line.split()[1]
        break
    assert in_flight is not None, "the save of step 4 never started"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
  assert os.path.isdir(in_flight)                       # killed with step 4 uncommitted
  assert checkpoints.latest_step(tmp_path / "run") == 2
  resumed = run(tmp_path / "run", num_train_steps=6, checkpoint_every_steps=2,
                async_checkpointing=True)
  assert sorted(resumed.losses) == [3, 4, 5, 6]
  for s in (3, 4, 5, 6):
    assert resumed.losses[s] == reference.losses[s], s
  for a, b in zip(_params(tmp_path / "reference", 6), _params(tmp_path / "run", 6)):
    np.testing.assert_array_equal(a, b)
