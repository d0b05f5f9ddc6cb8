"""The run's folder: checked before anything is written, then opened with ``config.json``, the
TensorBoard writer (process 0) and ``parameters.txt``; and the device mesh the run uses."""

from __future__ import annotations

import os
from typing import Any

import jax
from absl import logging
from flax import nnx

from convmae_jax.train import sharding as sharding_lib
from convmae_jax.train.errors import ConfigError


def flatten_config(d: Any, prefix: str = "") -> dict[str, Any]:
  """A nested config dict as ``{"a.b": scalar}`` for TensorBoard hparams."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten_config(v, key + "."))
    elif isinstance(v, (int, float, str, bool)) or v is None:
      out[key] = v if v is not None else "None"
    else:
      out[key] = str(v)
  return out


class _NullWriter:
  """The metric writer of processes other than 0: they write nothing."""

  def __getattr__(self, name):
    return lambda *args, **kwargs: None


def check_workdir(workdir: str) -> None:
  """ConfigError, before anything is written, when ``workdir`` is a file or cannot be written."""
  path = os.fspath(workdir)
  if "://" in path:                                    # gs://...: checked by the first write
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"--workdir={path!r} is a file; give a folder (it is created if missing).")
  parent = path
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent.rstrip(os.sep)) or (os.sep if path.startswith(os.sep) else ".")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir={path!r} cannot be written ({parent!r} is not writable for this "
                      "user); give a folder you can write to.")


def open_workdir(config, workdir: str, mesh_shape: tuple[int, int]):
  """Creates ``workdir`` (process 0) with ``config.json``, the TensorBoard writer (process 0; the
  console gets its own progress line, so the writer does not echo scalars) and the device mesh.
  Returns (path, writer, mesh)."""
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel

  path = epath.Path(workdir)
  if jax.process_index() == 0:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config.to_json_best_effort(indent=2))
    writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(os.fspath(workdir)))
  else:
    writer = _NullWriter()
  writer.write_hparams(flatten_config(config.to_dict()))
  mesh = sharding_lib.make_mesh(*mesh_shape)
  logging.info("%s job on %d %s device(s) in %d process(es), mesh %s. Outputs in %s: checkpoints/, "
               "TensorBoard logs (tensorboard --logdir=%s), config.json, parameters.txt.",
               config.get("job", "pretrain"), jax.device_count(), jax.devices()[0].platform,
               jax.process_count(), dict(mesh.shape), workdir, workdir)
  return path, writer, mesh


def write_parameter_table(workdir_path, params, name: str, model_config) -> None:
  """The per-parameter table into ``parameters.txt`` (process 0); one summary line on the console."""
  from clu import parameter_overview  # pylint: disable=import-outside-toplevel

  n = sum(x.size for x in jax.tree.leaves(params))
  if jax.process_index() == 0:
    table = parameter_overview.get_parameter_overview(nnx.to_pure_dict(params), include_stats=False)
    (workdir_path / "parameters.txt").write_text(
        f"{name} {model_config.to_dict()}\n{n:,} trainable parameters\n{table}\n")
  logging.info("Model %s: %.2fM trainable parameters (table in %s).", name, n / 1e6,
               workdir_path / "parameters.txt")
