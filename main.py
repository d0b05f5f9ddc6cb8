r"""Entry point: ``python main.py --config=configs/pretrain.py --workdir=DIR [--config.FIELD=VALUE ...]``.

Flags only; the work is in ``convmae_jax.train.train_and_evaluate``. On multi-host runs (TPU pod
slices, multi-node GPU) jax.distributed is initialised first.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/pretrain.py:base.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and figures.")
flags.mark_flags_as_required(["config", "workdir"])


def _is_multihost(config) -> bool:
  """True on launches that jax.distributed must join: asked for, or a multi-host environment."""
  env = os.environ
  return bool(
      config.get("jax_distributed", False)
      or env.get("JAX_COORDINATOR_ADDRESS")
      or "," in env.get("TPU_WORKER_HOSTNAMES", "")                       # Cloud TPU pod slice
      or int(env.get("SLURM_NTASKS", "1") or 1) > 1                        # SLURM, one task per host
      or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1)               # mpirun


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=import-outside-toplevel
  if _is_multihost(FLAGS.config):
    # Cloud TPU, SLURM and Open MPI are detected by JAX; elsewhere set JAX_COORDINATOR_ADDRESS
    # (host:port of process 0) with JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host.
    env = os.environ
    jax.distributed.initialize(
        num_processes=int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None,
        process_id=int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None)
  logging.info("JAX process %d/%d, local devices %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  from convmae_jax import data, train  # pylint: disable=import-outside-toplevel
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (train.ConfigError, data.DatasetNotPreparedError) as e:
    # A bad config value or missing data: found before any compute; the message says what to do.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
