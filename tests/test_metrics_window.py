"""The progress window's throughput and input-wait figures, on a fake clock (no timing is real)."""

import numpy as np
import pytest

from convmae_jax.train import metrics as metrics_lib


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


class Writer:
  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars[step] = dict(scalars)


def metrics(loss):
  return {"loss": np.float32(loss), "grad_norm": np.float32(1.0), "learning_rate": np.float32(1e-3),
          "skipped": np.float32(0.0)}


def test_input_wait_is_the_share_of_the_window_spent_waiting_for_batches(monkeypatch, capsys):
  clock = FakeClock()
  monkeypatch.setattr(metrics_lib.time, "perf_counter", clock)
  writer = Writer()
  window = metrics_lib.MetricsWindow(writer=writer, total_steps=10, batch_size=8, start_step=0)

  def batches(wait_per_batch):
    while True:
      clock.now += wait_per_batch       # the loop blocks this long in next()
      yield {"image": None}

  slow = batches(0.3)
  for step in range(1, 5):
    window.next_batch(slow)
    clock.now += 0.7                    # the step itself
    window.add(step, metrics(1.0))      # step 1 restarts the clock (compilation kept out)
  s = window.log(4)
  # Steps 2-4 after the restart: 3 x (0.3 wait + 0.7 step) = 3.0 s, of which 0.9 s waiting.
  assert s["input_wait_fraction"] == pytest.approx(0.3)
  assert s["images_per_sec"] == pytest.approx(3 * 8 / 3.0)
  assert writer.scalars[4]["input_wait_fraction"] == pytest.approx(0.3)
  assert "input wait 30%" in capsys.readouterr().out

  fast = batches(0.0)                   # the input keeps ahead: nothing is waited for
  for step in range(5, 9):
    window.next_batch(fast)
    clock.now += 0.5
    window.add(step, metrics(1.0))
  s = window.log(8)
  assert s["input_wait_fraction"] == 0.0
  assert s["images_per_sec"] == pytest.approx(4 * 8 / 2.0)
