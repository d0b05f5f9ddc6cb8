"""Training-state checkpoints: the model (trainable and frozen parts as one tree), the optimizer
state and the run's meta, saved by Orbax; restored onto the run's shardings, checked against the
config on the meta alone, with unreadable steps moved aside."""

from __future__ import annotations

from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from convmae_jax import checkpoints
from convmae_jax.train import sharding as sharding_lib
from convmae_jax.train.errors import ConfigError
from convmae_jax.train.sharding import StateShardings


def deep_merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = deep_merge(out[k], v) if k in out and isinstance(v, dict) else v
  return out


def select(tree: Any, template: Any) -> Any:
  """The part of ``tree`` whose keys appear in ``template`` (int and digit-string keys match)."""
  if not isinstance(template, dict):
    return tree
  out = {}
  for k, v in template.items():
    src = tree[k] if k in tree else tree[str(k)]
    out[k] = select(src, v)
  return out


def save_train_state(ckpt_mgr, step: int, params, rest, opt_state, meta: dict) -> None:
  """Saves the model (params and rest merged into one pure dict), optimizer state and meta."""
  model_state = deep_merge(nnx.to_pure_dict(params), nnx.to_pure_dict(rest))
  ckpt_mgr.save(step, args=ocp.args.Composite(**{
      checkpoints.MODEL_ITEM: ocp.args.StandardSave(model_state),
      checkpoints.OPT_STATE_ITEM: ocp.args.StandardSave(opt_state),
      checkpoints.META_ITEM: ocp.args.JsonSave(meta),
  }), force=True)


def open_checkpoints(workdir: str, *, keep: int = 3, keep_period: int | None = None,
                     async_save: bool = True):
  """The training CheckpointManager of ``workdir``: the last ``keep`` steps, plus every
  ``keep_period``-th step for good, written asynchronously unless ``async_save`` is off."""
  return checkpoints.create_manager(workdir, max_to_keep=keep, async_save=async_save,
                                    keep_period=keep_period)


def restore_latest(open_manager: Callable[[], Any], restore: Callable[[Any, int], Any]):
  """Opens the checkpoint manager and returns ``(manager, step, restore(manager, step))`` for the
  latest step that can be read; step and restored are None when there is none.

  A step that cannot be read (a file truncated or lost after the save, an interrupted copy) is
  said so in the log, moved aside to ``{step}.damaged`` (never deleted) and the previous step is
  tried. A ConfigError from ``restore`` (a config that does not fit) is raised as it is. On any
  error the manager is closed, so no checkpoint thread outlives the run; otherwise the caller owns
  it.
  """
  from etils import epath  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  mgr = open_manager()
  try:
    while True:
      step = mgr.latest_step()
      if step is None:
        return mgr, None, None
      try:
        return mgr, step, restore(mgr, step)
      except ConfigError:
        raise
      except Exception as e:  # noqa: BLE001 - whatever broke the read, this step is unusable
        path = epath.Path(mgr.directory) / str(step)
        aside = path.parent / f"{step}.damaged"
        n = 1
        while aside.exists():
          n += 1
          aside = path.parent / f"{step}.damaged{n}"
        logging.warning("The checkpoint of step %d in %s cannot be read (%s: %s); it is moved to %s "
                        "and the previous checkpoint is used.", step, mgr.directory,
                        type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "", aside)
        mgr.close()
        mgr = None
        if jax.process_index() == 0:
          path.rename(aside)
        if jax.process_count() > 1:
          multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        mgr = open_manager()
  except BaseException:
    if mgr is not None:
      mgr.close()
    raise


def read_train_meta(ckpt_mgr, step: int) -> dict:
  """The ``meta`` item of a training checkpoint alone (cheap: no array is read)."""
  restored = ckpt_mgr.restore(step, args=ocp.args.Composite(**{
      checkpoints.META_ITEM: ocp.args.JsonRestore()}))
  return dict(restored[checkpoints.META_ITEM] or {})


def restore_train_state(ckpt_mgr, step: int, abstract_params, abstract_rest,
                        shardings: StateShardings, tx):
  """Restores (params, opt_state, rest, meta) of ``step`` onto ``shardings``.

  ``abstract_params`` / ``abstract_rest`` are the split abstract model (``nnx.eval_shape``); they are
  filled in place and returned.
  """
  pure_p = sharding_lib.abstract_with_shardings(nnx.to_pure_dict(abstract_params),
                                                nnx.to_pure_dict(shardings.params))
  pure_r = sharding_lib.abstract_with_shardings(nnx.to_pure_dict(abstract_rest),
                                                nnx.to_pure_dict(shardings.rest))
  abs_opt = sharding_lib.abstract_with_shardings(jax.eval_shape(tx.init, abstract_params),
                                                 shardings.opt_state)
  restored = ckpt_mgr.restore(step, args=ocp.args.Composite(**{
      checkpoints.MODEL_ITEM: ocp.args.StandardRestore(deep_merge(pure_p, pure_r)),
      checkpoints.OPT_STATE_ITEM: ocp.args.StandardRestore(abs_opt),
      checkpoints.META_ITEM: ocp.args.JsonRestore(),
  }))
  model_pure = restored[checkpoints.MODEL_ITEM]
  nnx.replace_by_pure_dict(abstract_params, select(model_pure, nnx.to_pure_dict(abstract_params)))
  nnx.replace_by_pure_dict(abstract_rest, select(model_pure, nnx.to_pure_dict(abstract_rest)))
  return (abstract_params, restored[checkpoints.OPT_STATE_ITEM], abstract_rest,
          dict(restored[checkpoints.META_ITEM]))
