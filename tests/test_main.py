"""main.py: a bad config value or missing data ends with a one-line reason and exit status 2."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=300)


def test_bad_config_value_exits_2_before_any_work(tmp_path):
  workdir = tmp_path / "run"
  proc = _main("--config=" + os.path.join(ROOT, "configs", "demo.py"), f"--workdir={workdir}",
               "--config.mask_ratio=1.2", tmp_path=tmp_path)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error: config.mask_ratio=1.2 is not accepted" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()


def test_missing_dataset_exits_2_with_preparation_steps(tmp_path):
  empty = tmp_path / "no_data"
  proc = _main("--config=" + os.path.join(ROOT, "configs", "pretrain.py"),
               f"--workdir={tmp_path / 'run'}", f"--config.data_dir={empty}", tmp_path=tmp_path)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f"TFDS looked in {empty}" in proc.stderr
  assert "python -m convmae_jax.data prepare imagenet2012" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_bad_host_malloc_exits_2_before_jax_starts(tmp_path):
  workdir = tmp_path / "run"
  proc = _main("--config=" + os.path.join(ROOT, "configs", "demo.py"), f"--workdir={workdir}",
               "--config.host_malloc=jemalloc", tmp_path=tmp_path)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert ("error: config.host_malloc='jemalloc' is not accepted; use 'auto' (reuse freed host "
          "memory on CPU-only installs), 'reuse' or 'system'") in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()
