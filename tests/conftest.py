"""Shared pytest setup: import the package from this checkout; keep TF quiet; one XLA compilation
cache for the whole session; a TFDS folder of each test process's own.

XLA:CPU compilation is where most of the suite's time goes, and many tests compile the same tiny
init, step and evaluation programs (in this process and in the subprocesses they start, which
inherit the environment). The cache lives in a fresh folder per session, so a run never reads
programs compiled by another checkout, and is removed at the end.
"""

import atexit
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# TF (used only by the data pipeline) stays quiet in test logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The embedded demo datasets are built on first use; under pytest-xdist two workers must not build
# them into one folder at the same time, so each test process has a folder of its own below one
# root made by the first process (the others inherit it) and removed when that process ends.
if "TFDS_DATA_DIR" not in os.environ or "CONVMAE_TEST_TFDS_ROOT" in os.environ:
  if "CONVMAE_TEST_TFDS_ROOT" not in os.environ:
    os.environ["CONVMAE_TEST_TFDS_ROOT"] = tempfile.mkdtemp(prefix="convmae-test-tfds-")
    atexit.register(shutil.rmtree, os.environ["CONVMAE_TEST_TFDS_ROOT"], ignore_errors=True)
  os.environ["TFDS_DATA_DIR"] = os.path.join(os.environ["CONVMAE_TEST_TFDS_ROOT"],
                                             os.environ.get("PYTEST_XDIST_WORKER", "main"))

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:   # xdist workers inherit the controller's
  _CACHE = tempfile.mkdtemp(prefix="convmae-test-xla-cache-")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  # Every program is cached, the smallest included: a model's eager initialisation compiles a few
  # dozen tiny programs (one per parameter shape and initialiser, ~0.2-0.4 s each), which every new
  # process (xdist worker, main.py subprocess, benchmark) would otherwise compile again. Measured,
  # convmae_tiny created in a second process: 4.6 s with a 0.3 s threshold, 1.2 s with none.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# The suite compiles many small programs and runs few large ones, so XLA:CPU's LLVM backend runs
# without its optimisation passes: programs compile about 3x faster (convmae_tiny's initialisation
# 12.5 s -> 4.3 s; test_complementary.py plus a rollback test 212 s -> 137 s on one core). XLA's
# own graph passes (fusion, layout) still run, and every assertion holds (tolerances are between
# sides computed in the same suite). Set XLA_FLAGS with the flag yourself to choose otherwise;
# tests that start processes with other XLA_FLAGS append to these.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()


# The files that take longest go first, so that under pytest-xdist (scripts/test.sh: each file on
# one worker, handed out in this order) no long file starts last while the other worker idles.
_LONGEST_FIRST = ("test_multiprocess.py", "test_rollback.py", "test_benchmarks.py",
                  "test_segment_job.py", "test_faults.py", "test_classification.py", "test_models.py",
                  "test_train.py", "test_segment.py", "test_complementary.py", "test_notebook.py",
                  "test_knn.py", "test_interop.py", "test_backbone.py", "test_api.py")


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
