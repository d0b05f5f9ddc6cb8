"""``config.nonfinite = "rollback"``: a non-finite loss sends the run back to its last checkpoint.

A NaN is put into the images of a chosen step by wrapping the pretraining job's host data: a
*transient* fault poisons only the first data stream a run opens (the one a rollback closes), a
*permanent* one every stream. Checked with numbers: the losses after recovery equal an uninterrupted
run's; the float32 replay equals a float32 run resumed from the same checkpoint and the steps after
it equal a bfloat16 run resumed from there; a resumed run repeats the losses of the run that rolled
back; a permanent fault ends the run after max_rollbacks; the count is in the result and in the
checkpoints' meta; bad values are refused before compute. (main.py's exit 3 after max_rollbacks,
with no traceback: tests/test_faults.py.)
"""

import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from convmae_jax import checkpoints, configs
from convmae_jax.train import ConfigError, NonFiniteLossError, precision, trainer, validation
from convmae_jax.train.jobs.classify import Classify
from convmae_jax.train.jobs.pretrain import Pretrain

STEPS = 6


def make_config(**overrides):
  c = configs.get_config("pretrain", "tiny")
  base = dict(dataset="imagenet2012", eval_split="validation", image_size=32, batch_size=8,
              num_train_steps=STEPS, warmup_steps=1, blr=0.05, dtype="float32", log_every_steps=1,
              checkpoint_every_steps=2, keep_checkpoints=10, recon_every_steps=0,
              recon_at_end=False, async_checkpointing=False, nonfinite="rollback")
  for key, value in {**base, **overrides}.items():
    c[key] = value
  return c


def run(workdir, on_log=None, **overrides):
  with tfds.testing.mock_data(num_examples=16):
    return trainer.train_and_evaluate(make_config(**overrides), str(workdir), on_log=on_log)


def poison(monkeypatch, step: int, *, permanent: bool = False, job=Pretrain):
  """NaN images at ``step`` in the first data stream ``job`` opens from now on (every stream when
  ``permanent``). Returns the list of the steps each opened stream started at."""
  original = job.train_data
  opened = []

  def train_data(self, start_step):
    opened.append(start_step)
    bad = permanent or len(opened) == 1
    for i, batch in enumerate(original(self, start_step)):
      if bad and start_step + i + 1 == step:
        batch = dict(batch, image=np.asarray(batch["image"], np.float32) * np.nan)
      yield batch

  monkeypatch.setattr(job, "train_data", train_data)
  return opened


def meta(workdir, step):
  return checkpoints.load_model_state(workdir, step=step)[1]


def arrays(workdir, step):
  pure, _ = checkpoints.load_model_state(workdir, step=step)
  return [np.asarray(x) for x in jax.tree.leaves(pure)
          if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted float32 run of the same config (its workdir, its result)."""
  workdir = tmp_path_factory.mktemp("reference")
  return workdir, run(workdir)


def test_a_transient_fault_leaves_no_trace_in_the_losses(tmp_path, monkeypatch, reference, caplog):
  ref_dir, ref = reference
  opened = poison(monkeypatch, 3)
  scalars = {}
  with caplog.at_level("WARNING"):
    result = run(tmp_path / "run", on_log=scalars.__setitem__)
  assert opened == [0, 2]                           # the data reopened at the checkpoint's step
  assert result.step == STEPS and result.rolled_back == [(3, 2)] and result.rollbacks == 1
  # The progress line's scalars (TensorBoard's): step 2 was logged before the rollback.
  assert [scalars[s]["rollbacks"] for s in range(1, STEPS + 1)] == [0, 0, 1, 1, 1, 1]
  for s in range(1, STEPS + 1):                     # bit for bit, the faulty step included
    assert result.losses[s] == ref.losses[s], s
  for a, b in zip(arrays(ref_dir, STEPS), arrays(tmp_path / "run", STEPS)):
    np.testing.assert_array_equal(a, b)
  lines = [r.getMessage() for r in caplog.records if "rolled back" in r.getMessage()]
  assert len(lines) == 1
  assert lines[0].startswith("step 3: loss nan, grad norm nan: rolled back to the checkpoint of "
                             "step 2 in ")
  assert "data from step 2; nothing else changed (rollback_fp32_steps=0). Rollback 1 of at most 3 " \
         "in a row, 1 in all." in lines[0]
  # The count is in every checkpoint written after the rollback, and none holds a non-finite value.
  assert [meta(tmp_path / "run", s)["rollbacks"] for s in (2, 4, 6)] == [0, 1, 1]
  for s in (2, 4, 6):
    assert all(np.all(np.isfinite(x)) for x in arrays(tmp_path / "run", s) if x.dtype.kind == "f")



def test_without_a_checkpoint_the_run_goes_back_to_its_initial_state(tmp_path, monkeypatch,
                                                                     reference):
  _, ref = reference
  opened = poison(monkeypatch, 2)
  result = run(tmp_path, checkpoint_every_steps=100, stop_after_steps=3)
  assert opened == [0, 0] and result.rolled_back == [(2, 0)] and result.step == 3
  for s in (1, 2, 3):
    assert result.losses[s] == ref.losses[s], s
  assert meta(tmp_path, 3)["rollbacks"] == 1


def test_float32_replay_then_bfloat16_again(tmp_path, monkeypatch, caplog):
  bf16 = dict(dtype="bfloat16", rollback_fp32_steps=2)
  # References: a bfloat16 run to step 3 (its step-3 loss is what bfloat16 gives from the
  # checkpoint the rollback restores, step 2); without its step-3 checkpoint it resumes from step 2
  # in float32 for steps 3..4, then in bfloat16 again for 5..6.
  head = run(tmp_path / "reference", dtype="bfloat16", stop_after_steps=3)
  shutil.rmtree(tmp_path / "reference" / "checkpoints" / "3")
  assert checkpoints.latest_step(tmp_path / "reference") == 2
  fp32 = run(tmp_path / "reference", dtype="float32", stop_after_steps=4)
  tail = run(tmp_path / "reference", dtype="bfloat16")

  opened = poison(monkeypatch, 3)
  with caplog.at_level("WARNING"):
    result = run(tmp_path / "run", **bf16)
  assert opened == [0, 2] and result.rolled_back == [(3, 2)]
  for s in (1, 2):
    assert result.losses[s] == head.losses[s], s
  for s in (3, 4):                                  # replayed in float32
    assert result.losses[s] == pytest.approx(fp32.losses[s], rel=1e-6), s
  # From the same state, bfloat16 gives another step-3 loss (1.06190 vs 1.06191 when measured);
  # the replay is ten times closer to float32 than that at least.
  gap = abs(head.losses[3] - fp32.losses[3])
  assert gap > 0 and abs(result.losses[3] - fp32.losses[3]) < gap / 10
  for s in (5, 6):                                  # bfloat16 again
    assert result.losses[s] == tail.losses[s], s
  line = next(r.getMessage() for r in caplog.records if "rolled back" in r.getMessage())
  assert "data from step 2; steps 3..4 run in float32, then bfloat16 again." in line
  assert meta(tmp_path / "run", 4)["rollback_fp32_until"] == 4

  # Killed inside the float32 steps (here: stopped after step 3), then resumed: step 4 still runs in
  # float32, the run repeats the losses of the run that rolled back, and the rollback count is
  # carried by the checkpoint.
  monkeypatch.undo()
  opened = poison(monkeypatch, 3)
  first = run(tmp_path / "resumed", stop_after_steps=3, **bf16)
  assert first.rolled_back == [(3, 2)] and first.losses[3] == result.losses[3]
  assert opened == [0, 2]
  second = run(tmp_path / "resumed", **bf16)
  assert sorted(second.losses) == [4, 5, 6]
  assert second.rollbacks == 1 and second.rolled_back == []
  for s in (4, 5, 6):
    assert second.losses[s] == result.losses[s], s
  assert meta(tmp_path / "resumed", 6)["rollbacks"] == 1


def test_a_permanent_fault_stops_after_max_rollbacks(tmp_path, monkeypatch, caplog):
  opened = poison(monkeypatch, 3, permanent=True)
  # dtype "auto" on a CPU without bfloat16 arithmetic is float32, for the rollback too.
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setattr(precision, "cpu_flags", lambda *a, **k: {"avx2", "fma"})
  with caplog.at_level("INFO"), pytest.raises(NonFiniteLossError) as info:
    run(tmp_path, max_rollbacks=2, rollback_fp32_steps=2, dtype="auto")
  message = str(info.value)
  assert message.startswith("Loss is nan at step 3 (grad norm nan) after 2 rollbacks in a row to "
                            "the checkpoint of step 2 in ")
  assert "(max_rollbacks=2); stopping. The last checkpoint is step 2 in " in message
  assert opened == [0, 2, 2]                         # two rollbacks, no third
  lines = [r.getMessage() for r in caplog.records if "rolled back" in r.getMessage()]
  assert [line.split(":")[0] for line in lines] == ["step 3", "step 3"]
  assert "Rollback 2 of at most 2 in a row, 2 in all." in lines[1]
  # (float32 is the compute dtype here: the replay has nothing to change.)
  assert "nothing else changed (already float32)" in lines[0]
  assert ("Compute dtype: float32 (config.dtype='auto': CPU only, and this CPU has no bfloat16 "
          "arithmetic (avx512_bf16 or amx_bf16), where bfloat16 is slower than float32).") in [
              r.getMessage() for r in caplog.records]
  assert checkpoints.latest_step(tmp_path) == 2
  assert all(np.all(np.isfinite(x)) for x in arrays(tmp_path, 2) if x.dtype.kind == "f")


def test_fine_tuning_rolls_back_with_its_evaluator(tmp_path, monkeypatch):
  # Fine-tuning on the digits (a ConvViT, labels, mixup), evaluated at step 3 between the restored
  # checkpoint (step 2) and the fault (step 4): the evaluation runs again and comes out the same.
  fine = dict(dataset="convmae_demo_digits", eval_split="test", num_classes=10, image_size=32,
              dtype="float32", batch_size=16, eval_batch_size=40, eval_num_examples=40,
              eval_every_steps=3, num_train_steps=5, warmup_steps=2, log_every_steps=1,
              checkpoint_every_steps=2, keep_checkpoints=10, rand_augment="",
              crop_scale=(0.35, 1.0), async_checkpointing=False, nonfinite="rollback")

  def run_fine(workdir):
    c = configs.get_config("finetune", "tiny")
    for key, value in fine.items():
      c[key] = value
    return trainer.train_and_evaluate(c, str(workdir))

  reference = run_fine(tmp_path / "reference")
  opened = poison(monkeypatch, 4, job=Classify)
  result = run_fine(tmp_path / "run")
  assert opened == [0, 2] and result.rolled_back == [(4, 2)]
  for s in range(1, 6):
    assert result.losses[s] == reference.losses[s], s
  assert result.metrics == reference.metrics and 3 in result.metrics
  assert meta(tmp_path / "run", 4)["best_top1"] == meta(tmp_path / "reference", 4)["best_top1"]
  assert meta(tmp_path / "run", 4)["rollbacks"] == 1


@pytest.mark.parametrize("field,value,match", [
    ("nonfinite", "retry",
     r"config.nonfinite='retry' is not accepted; use 'stop', 'skip' or 'rollback'"),
    ("rollback_fp32_steps", -1,
     r"config.rollback_fp32_steps=-1 is not accepted: expected an integer >= 0"),
    ("max_rollbacks", 0, r"config.max_rollbacks=0 is not accepted: expected an integer >= 1"),
])
def test_bad_rollback_settings_are_refused_before_compute(tmp_path, field, value, match):
  c = make_config()
  c[field] = value
  with pytest.raises(ConfigError, match=match):
    validation.validate_config(c, num_devices=1, process_count=1)
  with pytest.raises(ConfigError, match=match):
    trainer.train_and_evaluate(c, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()
  fine = configs.get_config("finetune", "tiny")
  fine.nonfinite, fine[field] = "rollback", value
  if field == "nonfinite":
    fine.nonfinite = value
  with pytest.raises(ConfigError, match=match):
    validation.validate_classification_config(fine, num_devices=1, process_count=1)
