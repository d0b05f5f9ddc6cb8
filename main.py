r"""Entry point: ``python main.py --config=configs/pretrain.py --workdir=DIR [--config.FIELD=VALUE ...]``.

Flags only; the work is in ``convmae_jax.train.train_and_evaluate``. On multi-host runs (TPU pod
slices, multi-node GPU) jax.distributed is initialised first.
"""

import difflib
import importlib.util
import inspect
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")   # TensorFlow's C++ INFO lines say nothing here

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


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_paths(node, prefix: str = "") -> list[str]:
  out = []
  for key in node.keys():
    path = f"{prefix}{key}"
    out.append(path)
    child = node[key]
    if hasattr(child, "keys") and callable(child.keys):
      out.extend(_config_paths(child, path + "."))
  return out


# The parsers ml_collections uses for these field types (a value they refuse is a FATAL flags error).
_VALUE_PARSERS = {int: flags.IntegerParser(), float: flags.FloatParser(), bool: flags.BooleanParser()}


def _check_override_value(config, name: str, raw: str, path: str) -> None:
  """Refuses ``--config.name=raw`` when ``raw`` does not parse as the field's int/float/bool type."""
  node, leaf = config, name
  while "." in leaf:
    head, leaf = leaf.split(".", 1)
    node = node[head]
  try:
    field_type = node.get_type(leaf)
  except Exception:  # noqa: BLE001 - not a typed leaf: left to the flags parser
    return
  parser = _VALUE_PARSERS.get(field_type)
  if parser is None:
    return
  try:
    parser.parse(raw)
  except ValueError:
    article = "an" if field_type is int else "a"
    _fail(f"--config.{name}={raw}: not {article} {field_type.__name__} (the type of {name} in "
          f"{path}, now {node[leaf]!r}).")


def check_command_line(argv: list[str]) -> None:
  """Refuses, before flags are parsed (whose errors are tracebacks or FATAL lines), a --config file
  that does not exist or does not load, --config.FIELD overrides of fields the config does not have
  (naming the closest ones) and override values that are not of the field's int/float/bool type.
  Exit status 2."""
  spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
  if spec is None:
    return                                            # absl says --config is required
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    here = os.path.dirname(os.path.abspath(__file__))
    known = sorted(f for f in os.listdir(os.path.join(here, "configs")) if f.endswith(".py")
                   and not f.startswith("_"))
    _fail(f"--config={spec}: no such file {path!r}; the configs are "
          + ", ".join(f"configs/{f}" for f in known) + " (a size or variant may follow a colon, "
          "e.g. configs/pretrain.py:large).")
  try:
    module_spec = importlib.util.spec_from_file_location("cli_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None) if arg else module.get_config()
  except Exception as e:  # noqa: BLE001 - any failure to build the config is the user's input
    _fail(f"--config={spec}: could not be loaded ({type(e).__name__}: {e}).")
  fields = _config_paths(config)
  for a in argv[1:]:
    if a.startswith("--config."):
      name = a[len("--config."):].split("=", 1)[0]
      if name and name not in fields:
        close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        source = inspect.getsourcefile(module.get_config) or path
        _fail(f"--config.{name}: {path} has no field {name!r}.{hint} Every field is listed, with a "
              f"comment, in {os.path.relpath(source)}.")
      if name and "=" in a:
        _check_override_value(config, name, a.split("=", 1)[1], path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Before JAX starts its backend: XLA:CPU's per-step temporaries then come from reused heap memory
  # instead of fresh mappings (convmae_jax/host_malloc.py).
  from convmae_jax import host_malloc  # pylint: disable=import-outside-toplevel
  try:
    host_malloc.apply(FLAGS.config.get("host_malloc", "auto"))   # the run's log says what it did
  except (ValueError, OSError) as e:
    _fail(str(e))
  from convmae_jax.train import logs  # pylint: disable=import-outside-toplevel
  logs.quiet_library_logs()
  import jax  # pylint: disable=import-outside-toplevel
  if _is_multihost(FLAGS.config):
    # Cloud TPU, SLURM and Open MPI are detected by JAX; elsewhere set JAX_COORDINATOR_ADDRESS
    # (host:port of process 0) with JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host.
    # JAX's own heartbeat is longer than config.peer_timeout_s: the trainer's watchdog names a lost
    # process first.
    from convmae_jax.train import peers  # pylint: disable=import-outside-toplevel
    env = os.environ
    jax.distributed.initialize(
        num_processes=int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None,
        process_id=int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None,
        heartbeat_timeout_seconds=peers.jax_heartbeat_timeout(
            FLAGS.config.get("peer_timeout_s", 120.0)))
  if jax.process_count() > 1:
    logging.info("JAX process %d/%d, local devices %s", jax.process_index(), jax.process_count(),
                 jax.local_devices())
  from convmae_jax import data, train  # pylint: disable=import-outside-toplevel
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (train.ConfigError, data.DatasetNotPreparedError) as e:
    # A bad config value or missing data: found before any compute; the message says what to do.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except train.NonFiniteLossError as e:
    # The message names the step and the last (finite) checkpoint to resume from.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  except train.BadRecordsError as e:
    # Too many undecodable records: the message names some and the checkpoint written at the stop.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(4)


if __name__ == "__main__":
  check_command_line(sys.argv)
  app.run(main)
