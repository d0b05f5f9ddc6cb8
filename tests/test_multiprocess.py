"""Two processes × 4 virtual CPU devices joined by jax.distributed: the multi-host (pod) path.

Each process reads its own slice of mock ImageNet; together they train one model on one mesh
(data 4 × fsdp 2), so both must log the same losses and one checkpoint must come out.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from convmae_jax import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import jax
    jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2,
                               process_id={pid}, initialization_timeout=60)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    import test_train
    result = test_train.run({workdir!r}, **{{"mesh.data": 4, "mesh.fsdp": 2}})
    print("LOSSES=" + json.dumps({{str(k): v for k, v in result.losses.items()}}))
    jax.distributed.shutdown()
""")


def _env() -> dict:
  """Two processes of 4 CPU devices each, compiling their programs themselves: with the session's
  compilation cache one process could load a program the other still compiles, and this file
  checks peers that run in step."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_one_model(tmp_path):
  port = _free_port()
  env = _env()
  procs = []
  for pid in range(2):
    code = _WORKER.format(root=ROOT, tests=os.path.join(ROOT, "tests"), port=port, pid=pid,
                          workdir=str(tmp_path))
    procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outputs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=400)
      assert p.returncode == 0, err[-4000:]
      outputs.append(out)
  finally:
    for p in procs:  # a missing peer makes jax abort rather than raise: never leave one behind
      if p.poll() is None:
        p.kill()
  losses = []
  for out in outputs:
    line = [l for l in out.splitlines() if l.startswith("LOSSES=")][-1]
    losses.append({int(k): v for k, v in json.loads(line[len("LOSSES="):]).items()})
  assert sorted(losses[0]) == [1, 2, 3, 4]
  assert losses[0].keys() == losses[1].keys()
  np.testing.assert_allclose([losses[1][s] for s in sorted(losses[1])],
                             [losses[0][s] for s in sorted(losses[0])], rtol=1e-6)
  assert all(np.isfinite(v) for v in losses[0].values())
  assert checkpoints.latest_step(tmp_path) == 4


_LONG_WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import jax
    from convmae_jax.train import peers
    jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2,
                               process_id={pid}, initialization_timeout=60,
                               heartbeat_timeout_seconds=peers.jax_heartbeat_timeout({bound}))
    import tensorflow_datasets as tfds
    import test_train
    from convmae_jax.train import trainer
    config = test_train.make_config(**{{"mesh.data": 4, "mesh.fsdp": 2, "num_train_steps": 100000,
                                        "checkpoint_every_steps": 2, "peer_timeout_s": {bound}}})
    with tfds.testing.mock_data(num_examples=16):
      trainer.train_and_evaluate(config, {workdir!r},
                                 on_log=lambda step, m: print("STEP", step, flush=True))
""")

BOUND_S = 15          # config.peer_timeout_s of the run below
SLACK_S = 45          # generous: the check runs every 0.5 s; the machine may be busy


@pytest.mark.parametrize("lost", [1, 0], ids=["worker_lost", "coordinator_lost"])
def test_a_lost_peer_ends_the_survivor_within_the_bound_naming_it(tmp_path, lost):
  """One process is SIGKILLed mid-run; the other must not hang.

  Process 1 lost: the survivor's watchdog ends it with status 5 within peer_timeout_s (+ slack),
  naming process 1 and the last checkpoint. Process 0 lost (it hosts the jax.distributed service):
  JAX itself aborts the survivor (SIGABRT) as soon as the service stops answering, saying that the
  leader task died; the watchdog's bound is then only the backstop.
  """
  port = _free_port()
  env = _env()
  procs = [subprocess.Popen(
      [sys.executable, "-c", _LONG_WORKER.format(root=ROOT, tests=os.path.join(ROOT, "tests"),
                                                 port=port, pid=pid, workdir=str(tmp_path),
                                                 bound=BOUND_S)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in range(2)]
  try:
    victim, survivor = procs[lost], procs[1 - lost]
    deadline = time.monotonic() + 400
    for line in victim.stdout:                 # past a checkpoint: step 3 logged
      if line.startswith("STEP") and int(line.split()[1]) >= 3:
        break
      assert time.monotonic() < deadline, "the run did not reach step 3"
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = survivor.communicate(timeout=BOUND_S + SLACK_S + 60)   # the safety net of the test
    waited = time.monotonic() - killed
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert victim.wait() == -signal.SIGKILL, (victim.stderr.read()[-3000:], err[-3000:])
  print(f"survivor exited {waited:.1f} s after the kill (bound {BOUND_S} s), status "
        f"{survivor.returncode}")
  assert waited <= BOUND_S + SLACK_S, waited
  if lost == 0:
    assert survivor.returncode == -signal.SIGABRT, err[-4000:]
    assert "the leader task was preempted/died" in err
    return
  assert survivor.returncode == 5, err[-4000:]
  line = [l for l in err.splitlines() if l.startswith("error: lost process")]
  assert len(line) == 1, err[-4000:]
  assert line[0].startswith(f"error: lost process {lost} (no heartbeat for ")
  step = checkpoints.latest_step(tmp_path)
  assert step is not None and step >= 2
  assert line[0].endswith(f"last checkpoint: step {step} in {tmp_path / 'checkpoints'}")
