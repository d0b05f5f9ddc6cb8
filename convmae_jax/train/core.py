"""The training core every job shares: random streams, schedules, the jitted step, the metrics
window, stop requests and training-state checkpoints.

The pretraining trainer (``trainer.py``) and the classification trainer (``classification.py``:
fine-tuning and linear probing) are thin loops over these pieces:

* :func:`stream_key` -- every random number inside a step comes from ``fold_in(key(seed), stream)``
  folded with the step, so a resumed run repeats an uninterrupted one exactly;
* :func:`num_train_examples`, :func:`schedule_lengths`, :func:`make_schedule` -- epochs to steps and
  the warmup + half-cosine lr schedule;
* :func:`build_train_step` -- the functional step ``(params, opt_state, rest, batch, step) ->
  (params, opt_state, rest, metrics)``, jitted with explicit shardings and donated state, with
  gradient accumulation, remat, and the model's dropout streams reseeded from the step;
* :class:`MetricsWindow` -- metrics kept on the devices until a log step, the progress line, the
  throughput/ETA figures and the stop on a non-finite loss;
* :class:`StopRequest` -- SIGTERM / Ctrl-C / a pod preemption notice finish the step, checkpoint, stop;
* :func:`save_train_state` / :func:`restore_train_state` -- Orbax training checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from convmae_jax import checkpoints, data
from convmae_jax.train import optim, sharding as sharding_lib
from convmae_jax.train.errors import ConfigError

# Stream ids folded into the run seed, so no two uses ever share random numbers.
MASKING_STREAM = 1    # pretraining masking noise
FIGURE_STREAM = 2     # the fixed masks of the reconstruction figure
DROPOUT_STREAM = 3    # drop path (the model's `dropout` RNG streams)
MIXUP_STREAM = 4      # mixup / cutmix


def stream_key(seed: int, stream: int) -> jax.Array:
  """``fold_in(key(seed), stream)``; fold the step in (inside the step) to get that step's key."""
  return jax.random.fold_in(jax.random.key(seed), stream)


# --------------------------------------------------------------------------------------------------
# Logging and config helpers.
# --------------------------------------------------------------------------------------------------
_PROJECT_PATHS = (os.sep + "convmae_jax" + os.sep, os.sep + "main.py")
# Library warnings that say nothing a user can act on.
_NOISE = ("has no dataset_info.json",)


class _QuietLibraries(std_logging.Filter):
  """Keeps this project's INFO lines and every library's warnings and errors; drops the INFO
  chatter of JAX, TFDS, Orbax and clu (backend probing, dataset info, checkpoint internals)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    path = record.pathname or ""
    if any(p in path for p in _PROJECT_PATHS):
      return True
    if record.levelno < std_logging.WARNING:
      return False
    return not any(n in record.getMessage() for n in _NOISE)


def quiet_library_logs() -> None:
  """Installs the filter on absl's handler (and the root logger's handlers), so records of every
  logger that reaches the console pass it. TensorFlow's C++ INFO lines are hidden as well."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  handlers = [logging.get_absl_handler()] + list(std_logging.getLogger().handlers)
  for handler in handlers:
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
      handler.addFilter(_QuietLibraries())


def in_notebook() -> bool:
  """True inside a Jupyter/Colab kernel (where absl's log lines are not shown by default)."""
  shell = sys.modules.get("IPython")
  try:
    return shell is not None and "ipykernel" in sys.modules and \
        shell.get_ipython() is not None and hasattr(shell.get_ipython(), "kernel")
  except Exception:  # noqa: BLE001 - any doubt: not a notebook
    return False


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


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# --------------------------------------------------------------------------------------------------
# Epochs, steps and the lr schedule.
# --------------------------------------------------------------------------------------------------
def num_train_examples(config) -> int:
  """Examples in the training split: from the dataset's info, else ``config.num_train_examples``."""
  n = config.get("num_train_examples", -1)
  if n and n > 0:
    return int(n)
  try:
    return int(data.num_examples(config.dataset, split=config.train_split,
                                 data_dir=config.get("data_dir") or None))
  except (FileNotFoundError, ValueError):  # missing dataset / bad split: data's message says it all
    raise
  except Exception as e:  # the info is needed only to turn epochs into steps
    raise ConfigError(
        f"Could not read the number of examples of {config.dataset!r} split "
        f"{config.train_split!r} ({type(e).__name__}: {e}); set config.num_train_examples, or "
        "config.num_train_steps instead of num_epochs.") from e


def schedule_lengths(config, n_examples: int | None) -> tuple[int, float, float]:
  """(total_steps, warmup_steps, steps_per_epoch) for the config's epochs or explicit step count."""
  steps_per_epoch = (n_examples / config.batch_size) if n_examples else float("nan")
  if config.num_train_steps != -1:
    total = int(config.num_train_steps)
  else:
    total = int(math.ceil(config.num_epochs * steps_per_epoch))
  if config.get("warmup_steps", -1) != -1:
    warmup = float(config.warmup_steps)
  else:
    warmup = config.warmup_epochs * steps_per_epoch
  if not math.isfinite(warmup):
    raise ConfigError("config.warmup_epochs needs the dataset size; set config.warmup_steps or "
                      "config.num_train_examples.")
  return total, min(warmup, float(total)), steps_per_epoch


def resolve_schedule(config) -> tuple[int | None, int, float, float]:
  """(n_examples or None, total_steps, warmup_steps, steps_per_epoch); reads the dataset size only
  when epochs are used."""
  needs_size = config.num_train_steps == -1 or (config.get("warmup_steps", -1) == -1
                                                and config.warmup_epochs)
  try:
    n_examples = num_train_examples(config)
  except ValueError:
    if needs_size:
      raise
    n_examples = None  # only used to report epochs
  total, warmup, per_epoch = schedule_lengths(config, n_examples)
  return n_examples, total, warmup, per_epoch


def make_schedule(config, total_steps: int, warmup_steps: float):
  peak = optim.peak_learning_rate(config.blr, config.batch_size)
  return optim.warmup_cosine_schedule(peak_lr=peak, warmup_steps=warmup_steps,
                                      total_steps=total_steps, min_lr=config.get("min_lr", 0.0))


def end_step(config, total_steps: int) -> int:
  """The step this run stops at: ``total_steps``, or ``config.stop_after_steps`` when earlier."""
  stop_after = config.get("stop_after_steps", -1)
  return min(total_steps, stop_after) if stop_after and stop_after > 0 else total_steps


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


class Profiler:
  """``config.profile_steps = (a, b)``: a jax.profiler trace of steps a+1..b into
  ``{workdir}/profile`` (TensorBoard's profile plugin or Perfetto open it); (0, 0) = off."""

  def __init__(self, config, workdir_path):
    steps = tuple(config.get("profile_steps", (0, 0)) or (0, 0))
    self.start, self.stop = (int(steps[0]), int(steps[1])) if len(steps) == 2 else (0, 0)
    self.dir = os.fspath(workdir_path / "profile")
    self.active = False

  def __call__(self, done: int, metrics=None) -> None:
    """Call after step ``done`` was dispatched."""
    if self.stop <= self.start:
      return
    if done == self.start and not self.active:
      jax.profiler.start_trace(self.dir)
      self.active = True
    elif done == self.stop and self.active:
      jax.block_until_ready(metrics)
      jax.profiler.stop_trace()
      self.active = False
      logging.info("Profile of steps %d..%d written to %s.", self.start + 1, self.stop, self.dir)

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


# --------------------------------------------------------------------------------------------------
# Shardings of the training state.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StateShardings:
  """Shardings of a split model (params / rest), its optimizer state, the batch and scalars."""
  mesh: jax.sharding.Mesh
  params: Any
  rest: Any
  opt_state: Any
  batch: jax.sharding.NamedSharding
  replicated: jax.sharding.NamedSharding


def state_shardings(mesh, abstract_params, abstract_rest, tx) -> StateShardings:
  param_sh = sharding_lib.param_shardings(abstract_params, mesh)
  return StateShardings(
      mesh=mesh, params=param_sh,
      rest=sharding_lib.replicated_shardings(abstract_rest, mesh),
      opt_state=sharding_lib.opt_state_shardings(tx, abstract_params, param_sh, mesh),
      batch=sharding_lib.batch_sharding(mesh), replicated=sharding_lib.replicated(mesh))


# --------------------------------------------------------------------------------------------------
# The step.
# --------------------------------------------------------------------------------------------------
def reseed_all(model: nnx.Module, key: jax.Array) -> None:
  """Reseeds every RNG stream stored in ``model`` (drop path's are forked from ``dropout``, or from
  ``default`` when the model was built with ``nnx.Rngs(seed)``) from ``key``, streams of different
  names from different keys and each stream of a name with its own key (``nnx.reseed``)."""
  tags = sorted({stream.key.tag for _, stream in nnx.iter_graph(model)
                 if isinstance(stream, nnx.RngStream)})
  if tags:
    nnx.reseed(model, **{tag: jax.random.fold_in(key, i) for i, tag in enumerate(tags)})


# loss_fn(model, batch) -> (scalar loss, {name: scalar}): the model is the merged NNX module, batch
# a dict of this (micro-)batch's arrays. prepare(batch, step) -> batch runs first on the whole global
# batch (masking noise, mixup), so gradient accumulation sees exactly the rows of the full batch.
LossFn = Callable[[nnx.Module, Mapping[str, jax.Array]], tuple[jax.Array, dict]]
PrepareFn = Callable[[dict, jax.Array], dict]


def build_train_step(*, graphdef, param_filter, loss_fn: LossFn, tx: optax.GradientTransformation,
                     schedule, shardings: StateShardings, batch_size: int, grad_accum_steps: int = 1,
                     remat: bool = False, seed: int, batch_keys: tuple[str, ...] = ("image",),
                     prepare: PrepareFn | None = None, skip_nonfinite: bool = False):
  """The jitted training step ``(params, opt_state, rest, batch, step) -> (params, opt_state, rest,
  metrics)``.

  * ``params`` are the model's variables matched by ``param_filter`` (the trainable ones), ``rest``
    everything else (frozen weights, position embeddings, BatchNorm statistics, RNG state); both are
    merged with ``graphdef`` inside. ``rest`` comes back updated (BatchNorm statistics).
  * ``prepare(batch, step)`` adds the step's random inputs to the whole batch; it takes its keys from
    :func:`stream_key` folded with ``step``.
  * Every RNG stream of the model (drop path's) is reseeded from
    ``fold_in(fold_in(key(seed), DROPOUT_STREAM), step)`` (then the micro-batch index), so drop path
    draws new masks at every step and the same masks when a resumed run repeats a step.
  * ``grad_accum_steps > 1``: micro-batch ``k`` takes rows ``k, k+accum, ...`` so every device keeps
    its own rows; gradients, losses and ``loss_fn``'s scalars are averaged. ``remat``: keep only
    weight-matmul outputs and recompute convs, norms, activations and attention in the backward pass.
  * metrics: ``loss``, ``grad_norm``, ``learning_rate``, ``skipped`` and ``loss_fn``'s own scalars;
    with a ``bad`` batch feature (examples the data pipeline replaced), ``bad_examples``: how many
    of the global batch were bad (the same number on every process).
  * ``skip_nonfinite``: a step whose loss or gradient norm is not finite changes nothing
    (parameters, optimizer state and statistics keep their values; ``skipped`` = 1), so no
    non-finite value ever reaches the state or a checkpoint.
  Parameters, optimizer state and ``rest`` are donated.
  """
  accum = int(grad_accum_steps)
  dropout_key = stream_key(seed, DROPOUT_STREAM)
  batch_sh = {k: shardings.batch for k in batch_keys}

  def compute(p, r, batch, drop_key):
    # copy=True: fresh Variables in this trace, so drop path may advance its RNG counters and
    # BatchNorm update its statistics under value_and_grad.
    model = nnx.merge(graphdef, p, r, copy=True)
    reseed_all(model, drop_key)
    loss, aux = loss_fn(model, batch)
    _, _, new_r = nnx.split(model, param_filter, ...)
    return loss, (aux, new_r)

  if remat:
    compute = jax.checkpoint(compute, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  grad_fn = jax.value_and_grad(compute, has_aux=True)

  def train_step(p, opt, r, batch, step):
    r_in = r
    drop_key = jax.random.fold_in(dropout_key, step)
    batch = dict(batch)
    bad = batch.pop(data.BAD_KEY, None)   # examples the data pipeline had to replace
    if prepare is not None:
      batch = prepare(dict(batch), step)
    if accum == 1:
      (loss, (aux, r)), grads = grad_fn(p, r, batch, drop_key)
    else:
      micro_sh = jax.sharding.NamedSharding(shardings.mesh, jax.sharding.PartitionSpec(
          None, sharding_lib.BATCH_AXES))
      split = lambda x: jax.lax.with_sharding_constraint(
          jnp.swapaxes(x.reshape((batch_size // accum, accum) + x.shape[1:]), 0, 1), micro_sh)
      micro = jax.tree.map(split, batch)

      def body(carry, xs):
        loss_sum, aux_sum, grad_sum, r_c = carry
        k, mb = xs
        (l, (a, r_c)), g = grad_fn(p, r_c, mb, jax.random.fold_in(drop_key, k))
        return (loss_sum + l, jax.tree.map(jnp.add, aux_sum, a), jax.tree.map(jnp.add, grad_sum, g),
                r_c), None

      first = jax.tree.map(lambda x: x[0], micro)
      aux_shape = jax.eval_shape(lambda: compute(p, r, first, drop_key)[1][0])
      init = (jnp.zeros((), jnp.float32), jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), aux_shape),
              jax.tree.map(jnp.zeros_like, p), r)
      (loss, aux, grads, r), _ = jax.lax.scan(body, init, (jnp.arange(accum), micro))
      loss = loss / accum
      aux = jax.tree.map(lambda a: a / accum, aux)
      grads = jax.tree.map(lambda g: g / accum, grads)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = tx.update(grads, opt, p)
    new_p = optax.apply_updates(p, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      keep = lambda new, old: jnp.where(ok, new, old) if jnp.issubdtype(new.dtype, jnp.floating) \
          else new
      new_p = jax.tree.map(keep, new_p, p)
      new_opt = jax.tree.map(keep, new_opt, opt)
      r = jax.tree.map(keep, r, r_in)
    metrics = {**aux, "loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(step),
               "skipped": 1.0 - ok.astype(jnp.float32)}
    if bad is not None:
      metrics[BAD_METRIC] = jnp.sum(bad.astype(jnp.int32))
    return new_p, new_opt, r, metrics

  return jax.jit(train_step,
                 in_shardings=(shardings.params, shardings.opt_state, shardings.rest, batch_sh,
                               shardings.replicated),
                 out_shardings=(shardings.params, shardings.opt_state, shardings.rest,
                                shardings.replicated),
                 donate_argnums=(0, 1, 2))


# --------------------------------------------------------------------------------------------------
# Metrics, progress and throughput.
# --------------------------------------------------------------------------------------------------
class NonFiniteLossError(FloatingPointError):
  """A non-finite training loss; the message names the step and the last checkpoint."""


def min_examples_for_bad_check(config, n_examples: int | None) -> int:
  """How many examples a run reads before ``config.max_bad_fraction`` is checked: one epoch of the
  split or ``10 / max_bad_fraction``, whichever is fewer (so a few bad records early in the stream
  do not stop a run, and a whole epoch is judged by its true fraction)."""
  fraction = float(config.get("max_bad_fraction", 1.0))
  bound = math.ceil(10.0 / fraction) if fraction > 0 else math.inf
  if n_examples:
    bound = min(bound, int(n_examples))
  return int(bound) if math.isfinite(bound) else int(config.batch_size)


class BadRecordsError(RuntimeError):
  """More than ``config.max_bad_fraction`` of the examples read could not be decoded; the message
  names some of them and the checkpoint written at the stop."""


BAD_METRIC = "bad_examples"


def checkpoint_step(window: "MetricsWindow", ckpt_mgr, step: int, save: Callable[[], None],
                    due: bool) -> None:
  """The loop's checkpoint point: ``save()`` when ``due``; then, if more than max_bad_fraction of
  the examples read could not be decoded, saves (once) and raises BadRecordsError."""
  if due:
    save()
  problem = window.bad_records_problem()
  if problem is not None:            # too many undecodable records: stop with a checkpoint
    if not due:
      save()
    raise BadRecordsError(f"{problem} A checkpoint of step {step} is in {ckpt_mgr.directory}.")


class MetricsWindow:
  """Step metrics stay on the devices until a log step; then one progress line and one set of
  TensorBoard scalars: mean loss and grad norm of the window, lr, img/s (total and per device),
  input wait (share of the time the loop waited for the next batch), ETA, core-hours and epoch.
  Compilation (the first step of a run) is kept out of the throughput.
  """

  def __init__(self, *, writer, total_steps: int, batch_size: int, start_step: int,
               steps_per_epoch: float | None = None, last_checkpoint: Callable[[], str] = lambda: "?",
               label: str = "step", on_log: Callable[[int, dict], None] | None = None,
               nonfinite: str = "stop", max_consecutive_skips: int = 10,
               max_bad_fraction: float = 1.0, bad_examples: int = 0,
               min_examples_for_bad_check: int = 0):
    self.writer = writer
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.steps_per_epoch = steps_per_epoch
    self.last_checkpoint = last_checkpoint
    self.label = label
    self.num_devices = jax.device_count()
    self.pending: list[tuple[int, dict]] = []
    self.window: list[dict] = []
    self.core_hours = 0.0
    self._start, self._first = time.perf_counter(), start_step
    self._input_wait = 0.0
    self._run_start_step = start_step
    self._bar = None
    self.on_log = on_log
    self.nonfinite = nonfinite
    self.max_consecutive_skips = max_consecutive_skips
    self.consecutive_skips = 0
    self.skipped_steps: list[int] = []
    # Undecodable examples: the global count (from the step's metrics, carried over a resume by the
    # checkpoint), this process's first few by name, the ones already logged.
    self.bad_examples = int(bad_examples)
    self.max_bad_fraction = float(max_bad_fraction)
    self.min_examples_for_bad_check = int(min_examples_for_bad_check)
    self.fetched_step = start_step
    self.bad_names: list[str] = []
    self._bad_logged: set[bytes] = set()

  def add(self, step: int, metrics: dict) -> None:
    """Records step ``step``'s (device) metrics; times the first step of the run separately."""
    self.pending.append((step, metrics))
    if step == self._run_start_step + 1:
      jax.block_until_ready(metrics)
      logging.info("First step (with compilation) finished after %.1f s.",
                   time.perf_counter() - self._start)
      self.restart(step)

  def restart(self, step: int) -> None:
    """Starts the throughput clock at ``step`` (after the first step, or after an evaluation)."""
    self._start, self._first = time.perf_counter(), step
    self._input_wait = 0.0

  def next_batch(self, batches):
    """``next(batches)``, timing how long the loop waits for it. The window's share of such waits
    is ``input_wait_fraction``: near 0 when the input keeps ahead of the steps, large when the
    accelerator idles for data (more host cores or tf.data threads are needed)."""
    t0 = time.perf_counter()
    batch = next(batches)
    self._input_wait += time.perf_counter() - t0
    return batch

  def fetch(self) -> None:
    """Moves the pending metrics to the host. A non-finite loss raises NonFiniteLossError with
    ``nonfinite="stop"``; with "skip" the (already skipped) step is counted and logged, and more
    than ``max_consecutive_skips`` in a row raise."""
    for s, m in jax.device_get(self.pending):
      self.bad_examples += int(m.pop(BAD_METRIC, 0))
      self.fetched_step = s
      bad = bool(m.get("skipped", 0.0)) or not np.isfinite(m["loss"])
      if bad and self.nonfinite == "skip":
        self.consecutive_skips += 1
        self.skipped_steps.append(s)
        logging.warning("step %d: loss %s, grad norm %s: the update was skipped (%d in a row; the "
                        "run stops after %d).", s, float(m["loss"]), float(m["grad_norm"]),
                        self.consecutive_skips, self.max_consecutive_skips)
        if self.consecutive_skips > self.max_consecutive_skips:
          raise NonFiniteLossError(
              f"{self.consecutive_skips} consecutive steps up to step {s} had a non-finite loss and "
              f"were skipped; stopping. The last checkpoint is {self.last_checkpoint()}; lower "
              "config.blr, or use config.dtype='float32' if it was bfloat16.")
        continue
      if bad:
        raise NonFiniteLossError(
            f"Loss is {float(m['loss'])} at step {s} (grad norm {float(m['grad_norm'])}, lr "
            f"{float(m['learning_rate']):.3g}); stopping. The last checkpoint is "
            f"{self.last_checkpoint()}; lower config.blr, or use config.dtype='float32' if it was "
            "bfloat16, or --config.nonfinite=skip to skip such steps.")
      self.consecutive_skips = 0
      self.window.append(m)
    self.pending.clear()

  def note_bad_examples(self, step: int, batch: Mapping[str, Any]) -> None:
    """Logs, once per record, each example of this process's ``batch`` (numpy: ``bad``,
    ``example_id``, ``bad_reason``; the prefetcher's ``"host"`` item) that could not be decoded:
    its TFDS id and the decoder's message."""
    flags = batch.get(data.BAD_KEY)
    if flags is None or not np.any(flags):
      return
    ids, reasons = batch[data.ID_KEY], batch[data.REASON_KEY]
    for i in np.flatnonzero(flags):
      name = bytes(ids[i])
      if name in self._bad_logged:
        continue
      self._bad_logged.add(name)
      text = name.decode(errors="replace")
      if len(self.bad_names) < 5:
        self.bad_names.append(text)
      logging.warning("step %d: example %s cannot be decoded (%s); the mean-colour image replaces "
                      "it.", step, text, bytes(reasons[i]).decode(errors="replace"))

  def bad_records_problem(self) -> str | None:
    """Says so when more than ``max_bad_fraction`` of the examples read so far (all processes,
    all runs of this workdir) were bad, once ``min_examples_for_bad_check`` were read; else None."""
    seen = self.fetched_step * self.batch_size
    if seen < max(1, self.min_examples_for_bad_check):
      return None
    if self.bad_examples <= self.max_bad_fraction * seen:
      return None
    names = ", ".join(self.bad_names) if self.bad_names else "none of them in this process's slice"
    return (f"{self.bad_examples} of the {seen} examples read up to step {self.fetched_step} could "
            f"not be decoded ({self.bad_examples / seen:.3%}, more than max_bad_fraction="
            f"{self.max_bad_fraction:g}); stopping. First ones (TFDS ids): {names}. Repair or "
            "remove these records, or raise --config.max_bad_fraction to go on with the mean-colour "
            "image in their place.")

  def log(self, step: int) -> dict[str, float]:
    """Writes the window's scalars at ``step``, logs the progress line, returns the scalars."""
    self.fetch()
    elapsed = time.perf_counter() - self._start
    steps_timed = step - self._first
    self.core_hours += elapsed * self.num_devices / 3600.0
    w = self.window
    if not w:                          # every step of the window was skipped
      self.restart(step)
      return {"loss": float("nan"), "skipped_steps": float(len(self.skipped_steps)),
              BAD_METRIC: float(self.bad_examples)}
    scalars = {k: float(np.mean([m[k] for m in w])) for k in w[0]
               if k not in ("learning_rate", "skipped")}
    scalars["skipped_steps"] = float(len(self.skipped_steps))
    scalars[BAD_METRIC] = float(self.bad_examples)
    scalars["learning_rate"] = float(w[-1]["learning_rate"])
    scalars["core_hours"] = self.core_hours
    if self.steps_per_epoch and math.isfinite(self.steps_per_epoch):
      scalars["epoch"] = step / self.steps_per_epoch
    eta = float("nan")
    if steps_timed > 0 and elapsed > 0:
      img_s = steps_timed * self.batch_size / elapsed
      eta = (self.total_steps - step) * self.batch_size / img_s
      scalars.update(images_per_sec=img_s, images_per_sec_per_device=img_s / self.num_devices,
                     eta_hours=eta / 3600.0, input_wait_fraction=min(1.0, self._input_wait / elapsed))
    self.writer.write_scalars(step, scalars)
    extra = "".join(f" | {k} {scalars[k]:.4g}" for k in sorted(w[0])
                    if k not in ("loss", "grad_norm", "learning_rate", "skipped"))
    if self.skipped_steps:
      extra += f" | skipped {len(self.skipped_steps)}"
    if self.bad_examples:
      extra += f" | bad examples {self.bad_examples}"
    line = (f"{self.label} {step}/{self.total_steps} | loss {scalars['loss']:.4f} | lr "
            f"{scalars['learning_rate']:.3g} | grad_norm {scalars['grad_norm']:.3f}{extra} | "
            f"{scalars.get('images_per_sec', float('nan')):.1f} img/s "
            f"({scalars.get('images_per_sec_per_device', float('nan')):.1f}/device) | input wait "
            f"{100 * scalars.get('input_wait_fraction', float('nan')):.0f}% | eta {format_eta(eta)}")
    self._report(step, line, scalars)
    if self.on_log is not None:
      self.on_log(step, dict(scalars))
    self.window.clear()
    self.restart(step)
    return scalars

  def _report(self, step: int, line: str, scalars: dict) -> None:
    """The progress line: absl INFO under main.py; a progress bar in a notebook; printed when a
    script runs the trainer with absl's INFO lines hidden (outside app.run)."""
    if in_notebook():
      if self._bar is None:
        from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
        self._bar = tqdm(total=self.total_steps, initial=self._run_start_step, desc=self.label,
                         unit="step", dynamic_ncols=True)
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['learning_rate']:.3g}",
                            img_s=f"{scalars.get('images_per_sec', float('nan')):.1f}",
                            refresh=True)
      if step >= self.total_steps:
        self.close()
    elif logging.level_info():
      logging.info("%s", line)
    else:
      print(line, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


# --------------------------------------------------------------------------------------------------
# Stop requests.
# --------------------------------------------------------------------------------------------------
class StopRequest:
  """SIGTERM / Ctrl-C / a pod preemption notice → finish the step, checkpoint, and stop.

  Single process: Python handlers set a flag (a second signal acts as usual). Several processes:
  all of them must stop at the same step, which JAX's preemption sync point decides (via Orbax).
  Use as a context manager around the loop.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
    logging.warning("%s received: stopping after this step with a checkpoint.", self.signal_name)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def requested(self, step: int, ckpt_mgr) -> str | None:
    if jax.process_count() > 1:
      return "preemption" if ckpt_mgr.reached_preemption(step) else None
    return self.signal_name


# --------------------------------------------------------------------------------------------------
# Training-state checkpoints.
# --------------------------------------------------------------------------------------------------
def save_train_state(ckpt_mgr, step: int, params, rest, opt_state, meta: dict) -> None:
  """Saves the model (params and rest merged into one pure dict), optimizer state and meta."""
  model_state = deep_merge(nnx.to_pure_dict(params), nnx.to_pure_dict(rest))
  ckpt_mgr.save(step, args=ocp.args.Composite(**{
      checkpoints.MODEL_ITEM: ocp.args.StandardSave(model_state),
      checkpoints.OPT_STATE_ITEM: ocp.args.StandardSave(opt_state),
      checkpoints.META_ITEM: ocp.args.JsonSave(meta),
  }), force=True)


def open_checkpoints(config, workdir: str):
  """The training CheckpointManager of ``workdir`` (last ``keep_checkpoints`` steps, plus every
  ``keep_period``-th step for good, written asynchronously unless ``async_checkpointing`` is off)."""
  return checkpoints.create_manager(workdir, max_to_keep=config.get("keep_checkpoints", 3),
                                    async_save=config.get("async_checkpointing", True),
                                    keep_period=config.get("keep_period", 0) or None)


def restore_readable(config, workdir: str, ckpt_mgr, restore: Callable[[Any, int], Any]):
  """``restore(ckpt_mgr, step)`` of the latest step that can be read.

  A step that cannot be read (a file truncated or lost after the save, an interrupted copy) is
  said so in the log, moved aside to ``{step}.damaged`` (never deleted) and the previous step is
  tried. A ConfigError from ``restore`` (a config that does not fit) is raised as it is. Returns
  ``(ckpt_mgr, step, restored)``, step None when no step is left; ``ckpt_mgr`` may be a new one.
  """
  from etils import epath  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  while True:
    step = ckpt_mgr.latest_step()
    if step is None:
      return ckpt_mgr, None, None
    try:
      return ckpt_mgr, step, restore(ckpt_mgr, step)
    except ConfigError:
      raise
    except Exception as e:  # noqa: BLE001 - whatever broke the read, this step is unusable
      path = epath.Path(ckpt_mgr.directory) / str(step)
      aside = path.parent / f"{step}.damaged"
      n = 1
      while aside.exists():
        n += 1
        aside = path.parent / f"{step}.damaged{n}"
      logging.warning("The checkpoint of step %d in %s cannot be read (%s: %s); it is moved to %s "
                      "and the previous checkpoint is used.", step, ckpt_mgr.directory,
                      type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "", aside)
      ckpt_mgr.close()
      if jax.process_index() == 0:
        path.rename(aside)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
      ckpt_mgr = open_checkpoints(config, workdir)


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
