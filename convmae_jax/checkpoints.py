"""Checkpoints on disk: one layout for training runs and for model-only weights.

Layout (docs/internals.md): ``{workdir}/checkpoints/{step}/`` written by an Orbax
``CheckpointManager`` with Composite items

* ``model``     -- ``StandardSave`` of ``nnx.to_pure_dict(nnx.state(model))``: every variable, frozen
                   position embeddings and RNG state included;
* ``opt_state`` -- the optax state (training checkpoints only);
* ``meta``      -- ``JsonSave`` of ``{"model_name": str, "model_kwargs": dict, "step": int, ...}``.

A model-only checkpoint (what ``python -m convmae_jax.interop import`` writes) is the same layout with
one step (0) and the items ``model`` and ``meta`` only.

Every public function takes ``directory``: either a workdir (the folder holding ``checkpoints/``) or the
``checkpoints/`` folder itself. ``step=None`` means the latest step.

Orbax stores dict keys as strings, so the integer keys of ``nnx.List`` (``('blocks1', 0, ...)``) come
back as ``"0"``; :func:`load_model_state` turns digit-only keys back into ints so the pure dict can be fed
straight to ``nnx.replace_by_pure_dict``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

CHECKPOINTS_SUBDIR = "checkpoints"
MODEL_ITEM = "model"
OPT_STATE_ITEM = "opt_state"
META_ITEM = "meta"


# ----------------------------------------------------------------------------------------------------
# Where checkpoints live.
# ----------------------------------------------------------------------------------------------------
def checkpoint_dir(directory: str | os.PathLike, *, for_writing: bool = False) -> epath.Path:
  """Returns the ``checkpoints/`` folder for ``directory`` (a workdir or the folder itself).

  Reading: ``directory/checkpoints`` if it exists, else ``directory`` if it already holds step folders.
  Writing: ``directory`` when it is named ``checkpoints``, else ``directory/checkpoints``.
  """
  path = epath.Path(directory)
  if path.name == CHECKPOINTS_SUBDIR:
    return path
  sub = path / CHECKPOINTS_SUBDIR
  if for_writing or sub.exists():
    return sub
  if path.exists() and _step_dirs(path):
    return path
  return sub


def _step_dirs(path: epath.Path) -> list[int]:
  try:
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and p.is_dir())
  except (FileNotFoundError, NotADirectoryError):
    return []


def _no_checkpoint_error(directory, ckpt_dir, step=None, steps=()) -> FileNotFoundError:
  if step is not None and steps:
    return FileNotFoundError(
        f"No checkpoint for step {step} in {ckpt_dir}; the steps there are {list(steps)}. "
        "Pass one of those, or step=None for the latest.")
  return FileNotFoundError(
      f"No checkpoint found in {directory!s} (looked for finished step folders in {ckpt_dir}). "
      "Pass a training workdir, its checkpoints/ folder, or a folder written by "
      "convmae_jax.checkpoints.save_model / `python -m convmae_jax.interop import`.")


def create_manager(directory: str | os.PathLike, *, max_to_keep: int | None = None,
                   async_save: bool = True, read_only: bool = False,
                   keep_period: int | None = None) -> ocp.CheckpointManager:
  """An Orbax ``CheckpointManager`` over the ``checkpoints/`` folder of ``directory``.

  A writer (``read_only=False``) creates the folder and removes unfinished
  (``*.orbax-checkpoint-tmp``) folders left by a killed run; a reader does neither. Besides the
  last ``max_to_keep``, every step divisible by ``keep_period`` is kept for good.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      keep_period=keep_period or None,
      enable_async_checkpointing=async_save,
      # Readers leave a concurrent writer's unfinished folders alone (and do not create anything).
      cleanup_tmp_directories=not read_only,
      create=not read_only,
  )
  return ocp.CheckpointManager(checkpoint_dir(directory, for_writing=not read_only), options=options)


def latest_step(directory: str | os.PathLike) -> int | None:
  """The newest finished step in ``directory`` (workdir or checkpoints folder), or None if there is none."""
  ckpt_dir = checkpoint_dir(directory)
  if not ckpt_dir.exists():
    return None
  mgr = create_manager(directory, read_only=True)
  try:
    return mgr.latest_step()
  finally:
    mgr.close()


def _resolve_step(mgr: ocp.CheckpointManager, directory, step: int | None) -> int:
  steps = mgr.all_steps()
  if not steps:
    raise _no_checkpoint_error(directory, mgr.directory)
  if step is None:
    return max(steps)
  if step not in steps:
    raise _no_checkpoint_error(directory, mgr.directory, step, sorted(steps))
  return step


# ----------------------------------------------------------------------------------------------------
# Pure-dict helpers.
# ----------------------------------------------------------------------------------------------------
def model_state_dict(model_or_state: Any) -> dict:
  """``nnx.to_pure_dict`` of a module's full state (or of an ``nnx.State``); a dict passes through."""
  if isinstance(model_or_state, nnx.Module):
    return nnx.to_pure_dict(nnx.state(model_or_state))
  if isinstance(model_or_state, nnx.State):
    return nnx.to_pure_dict(model_or_state)
  if isinstance(model_or_state, Mapping):
    return dict(model_or_state)
  raise TypeError(f"Expected an nnx.Module, nnx.State or dict, got {type(model_or_state).__name__}.")


def restore_int_keys(tree: Any) -> Any:
  """Turns digit-only string keys (how Orbax stores ``nnx.List`` indices) back into ints, recursively."""
  if isinstance(tree, Mapping):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): restore_int_keys(v)
            for k, v in tree.items()}
  return tree


def _flat(tree: Mapping) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      for sub, leaf in _flat(v).items():
        out[(k,) + sub] = leaf
    else:
      out[(k,)] = v
  return out


def _is_rng_path(path: tuple) -> bool:
  # RNG streams (nnx.Rngs stored in a module) end in ('<stream>', 'key'|'count') under an 'rngs' attribute.
  return any(isinstance(p, str) and p.endswith("rngs") for p in path) and path[-1] in ("key", "count")


# ----------------------------------------------------------------------------------------------------
# Model-only checkpoints.
# ----------------------------------------------------------------------------------------------------
def save_model(directory: str | os.PathLike, model: Any, metadata: Mapping[str, Any], *,
               step: int = 0, overwrite: bool = False) -> epath.Path:
  """Writes a model-only checkpoint (items ``model`` and ``meta``) and waits until it is on disk.

  Args:
    directory: workdir or ``checkpoints/`` folder; created if missing.
    model: an ``nnx.Module`` (its whole state is saved), an ``nnx.State`` or a pure dict.
    metadata: JSON-able dict, normally ``{"model_name": ..., "model_kwargs": {...}}``; ``step`` is added.
    step: the step folder to write.
    overwrite: replace an existing checkpoint at ``step`` instead of raising ``FileExistsError``.

  Returns:
    The path of the written step folder.
  """
  state = model_state_dict(model)
  meta = dict(metadata)
  meta.setdefault("step", int(step))
  mgr = create_manager(directory, async_save=False)
  try:
    if step in mgr.all_steps():
      if not overwrite:
        raise FileExistsError(
            f"A checkpoint for step {step} already exists in {mgr.directory}; pass overwrite=True "
            "to replace it.")
      mgr.delete(step)
    mgr.save(step, args=ocp.args.Composite(**{
        MODEL_ITEM: ocp.args.StandardSave(state),
        META_ITEM: ocp.args.JsonSave(meta),
    }), force=True)
    mgr.wait_until_finished()
    return epath.Path(mgr.directory) / str(step)
  finally:
    mgr.close()


def load_model_state(directory: str | os.PathLike, *, step: int | None = None) -> tuple[dict, dict]:
  """Reads the ``model`` and ``meta`` items of a training or model-only checkpoint.

  Returns:
    ``(pure_dict, metadata)``: the nested dict of ``nnx.to_pure_dict`` form (``nnx.List`` indices as
    ints, leaves as ``jax.Array`` on the default device) and the metadata dict.

  Raises:
    FileNotFoundError: when ``directory`` holds no checkpoint (or not the requested step).
  """
  if not checkpoint_dir(directory).exists():
    raise _no_checkpoint_error(directory, checkpoint_dir(directory))
  mgr = create_manager(directory, read_only=True)
  try:
    step = _resolve_step(mgr, directory, step)
    restored = mgr.restore(step, args=ocp.args.Composite(**{
        MODEL_ITEM: ocp.args.StandardRestore(),
        META_ITEM: ocp.args.JsonRestore(),
    }))
  finally:
    mgr.close()
  return restore_int_keys(dict(restored[MODEL_ITEM])), dict(restored[META_ITEM] or {})


def load_into(directory: str | os.PathLike, model: nnx.Module, *, step: int | None = None) -> dict:
  """Loads a checkpoint's weights into ``model`` in place and returns its metadata.

  Every variable of ``model`` must be in the checkpoint with the same shape (RNG stream state is the
  one exception: it is kept when absent). Arrays are cast to the model's dtypes and placed with the
  model's current shardings.

  Raises:
    FileNotFoundError: no checkpoint. ValueError: missing, unexpected or mis-shaped variables.
  """
  pure, meta = load_model_state(directory, step=step)
  state = nnx.state(model)
  target = nnx.to_pure_dict(state)
  flat_target, flat_ckpt = _flat(target), _flat(pure)
  missing = [p for p in flat_target if p not in flat_ckpt and not _is_rng_path(p)]
  unexpected = [p for p in flat_ckpt if p not in flat_target]
  bad_shape = [(p, np.shape(flat_ckpt[p]), np.shape(t)) for p, t in flat_target.items()
               if p in flat_ckpt and np.shape(flat_ckpt[p]) != np.shape(t)]
  if missing or unexpected or bad_shape:
    show = lambda paths: ", ".join("/".join(map(str, p)) for p in paths[:8])
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing from the checkpoint ({show(missing)})")
    if unexpected:
      parts.append(f"{len(unexpected)} in the checkpoint but not in the model ({show(unexpected)})")
    if bad_shape:
      parts.append("shape mismatches (" + ", ".join(
          f"{'/'.join(map(str, p))}: checkpoint {a} vs model {b}" for p, a, b in bad_shape[:8]) + ")")
    raise ValueError(f"Checkpoint {checkpoint_dir(directory)} (meta {meta.get('model_name')!r}, "
                     f"kwargs {meta.get('model_kwargs')}) does not fit the model: " + "; ".join(parts))

  def place(path, old):
    if path not in flat_ckpt:
      return old
    new = flat_ckpt[path]
    if jax.dtypes.issubdtype(old.dtype, jax.dtypes.prng_key):
      return new
    new = jax.numpy.asarray(new, dtype=old.dtype)
    sharding = getattr(old, "sharding", None)
    return jax.device_put(new, sharding) if sharding is not None else new

  merged = {}
  for path, old in flat_target.items():
    node = merged
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = place(path, old)
  nnx.replace_by_pure_dict(state, merged)
  nnx.update(model, state)
  return meta
