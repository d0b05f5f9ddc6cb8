"""The training loop, written once for every job: ``run(job, workdir)``.

A job (``train/jobs/``) says only what differs between pretraining, fine-tuning and linear probing:
how the model and its starting weights are made, which parameters train, the optimizer, the step's
random inputs and loss, the training data, its evaluators and extra checkpoint meta (the ``Job``
hooks below). The loop does the rest, in this order:

  checks (no compute) -> workdir, writer, mesh -> model (abstract), optimizer, shardings ->
  evaluators (their data read now) -> initialise or resume -> the jitted step -> data ->
  the steps (progress line, stop request, evaluators, checkpoints, bad-record check, and with
  ``nonfinite="rollback"`` the way back to the last checkpoint, ``rollback.py``) -> close.

The step is functional: the NNX model is split once into a graph definition, its trainable
parameters (``job.trainable``) and the rest (frozen weights, position embeddings, BatchNorm
statistics, RNG state); ``jax.jit`` runs ``step(params, opt_state, rest, batch, step)`` with explicit
shardings and donated state (``step.py``). Every random number comes from ``fold_in(key(seed),
stream)`` folded with the step and the data pipeline is positioned by step, so a resumed run repeats
an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from convmae_jax import data, host_malloc, models
from convmae_jax.train import input_pipeline, logs, optim, peers, schedule as schedule_lib
from convmae_jax.train import sharding as sharding_lib
from convmae_jax.train import state as state_lib
from convmae_jax.train import workdir as workdir_lib
from convmae_jax.train import precision, xla_cpu
from convmae_jax.train.errors import BadRecordsError, ConfigError, RollbackRequest
from convmae_jax.train.metrics import MetricsWindow, min_examples_for_bad_check
from convmae_jax.train.profiler import Profiler
from convmae_jax.train.rollback import Rollback
from convmae_jax.train.step import build_train_step
from convmae_jax.train.stop import StopRequest
from convmae_jax.train.validation import RunPlan, check_resume


@dataclasses.dataclass
class TrainResult:
  """What a run returns: the last step reached, the per-step losses it logged and the final model."""
  step: int
  losses: dict[int, float]
  model: nnx.Module | None
  workdir: str
  stopped_by: str | None = None   # "SIGTERM", "SIGINT" or "preemption" when the run was asked to stop
  metrics: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)  # eval results
  skipped_steps: list[int] = dataclasses.field(default_factory=list)  # nonfinite="skip"
  # nonfinite="rollback": rollbacks of all runs of this workdir so far (kept in the checkpoints'
  # meta), and (non-finite step, checkpoint step restored) of each rollback of this run.
  rollbacks: int = 0
  rolled_back: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  bad_examples: int = 0   # undecodable examples read (replaced), all runs of this workdir so far


@dataclasses.dataclass
class Setup:
  """What the loop has built before any compute, handed to the job's hooks."""
  workdir: epath.Path
  writer: Any                       # clu metric writer (process 0; the others write nothing)
  shardings: sharding_lib.StateShardings
  graphdef_eval: Any                # the model in eval mode (no drop path), split by ``job.trainable``
  abstract_model: nnx.Module        # shapes only (nnx.eval_shape)
  total_steps: int
  end_step: int                     # where this invocation stops (<= total_steps)

  @property
  def is_chief(self) -> bool:
    return jax.process_index() == 0


class Evaluator(Protocol):
  """A way of judging the model while it trains (``train/evaluators/``)."""
  description: str   # appended to the "Training steps ..." line ("" for nothing)

  def due(self, step: int, *, end_step: int, stopping: bool) -> bool:
    """Whether to run after step ``step`` (``stopping``: the run was asked to stop there)."""

  def __call__(self, step: int, params, rest) -> dict[str, float] | None:
    """Runs on the current weights; writes its own scalars; returns those kept in the result."""

  def state(self) -> dict:
    """What it must remember across a resume (goes into the checkpoint's meta)."""

  def restore(self, meta: dict) -> None:
    """Takes back ``state()`` from a resumed checkpoint's meta."""


class Job:
  """What a training job tells the loop. ``__init__`` checks the config (no compute); the hooks
  are called by ``run`` in the order they are listed."""

  trainable: Any = nnx.Param                 # nnx filter of the parameters that train
  batch_keys: tuple[str, ...] = ("image",)   # batch features the step reads
  forward_only_step = False                  # no backward pass through the encoder (linear probe)

  def __init__(self, config, plan: RunPlan):
    self.config = config
    self.plan = plan

  def check_inputs(self, workdir: str) -> None:
    """Reads what the run needs from disk (dataset info, the initial weights) and refuses what does
    not fit, before anything is written or computed."""

  def create_model(self, dtype: str | None = None) -> nnx.Module:
    """The job's model, randomly initialised; ``dtype`` ("float32", "bfloat16") replaces the
    config's compute dtype (the float32 replay after a rollback; parameters are float32 either
    way, so both models have the same state)."""
    overrides = dict(self.plan.model_overrides)
    if dtype is not None:
      overrides["dtype"] = dtype
    return models.create(self.config.model, rngs=nnx.Rngs(self.config.seed), **overrides)

  def make_schedule(self, total_steps: int, warmup_steps: float):
    """The learning-rate schedule (default: linear warmup then half-cosine, ``schedule.py``)."""
    return schedule_lib.make_schedule(self.config, total_steps, warmup_steps)

  def make_optimizer(self, schedule, abstract_params):
    raise NotImplementedError

  def evaluators(self, setup: Setup) -> list[Evaluator]:
    return []

  def initialise(self, model: nnx.Module) -> None:
    """A fresh run's starting weights, loaded into the randomly initialised ``model`` in place."""

  def prepare(self, setup: Setup, batch: dict, step) -> dict:
    """Inside the step, on the whole global batch: the step's random inputs (masking noise, mixup)."""
    del setup, step
    return batch

  def loss(self, model: nnx.Module, batch: dict):
    """``(scalar loss, {name: scalar})`` of a (micro-)batch."""
    raise NotImplementedError

  def train_data(self, start_step: int):
    """The host batches from ``start_step`` on (this process's rows)."""
    raise NotImplementedError

  def checkpoint_meta(self) -> dict:
    """Extra fields of every training checkpoint's meta."""
    return {}

  def summary(self, result: TrainResult, setup: Setup) -> None:
    """The closing log line."""


# --------------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------------
def run(job: Job, workdir: str, *, on_log=None) -> TrainResult:
  """Runs ``job`` in ``workdir``, resuming from its checkpoints when it has some.

  Writes TensorBoard events, ``config.json``, ``parameters.txt`` and Orbax checkpoints
  (``workdir/checkpoints``); the job's evaluators write their own outputs. ``on_log(step,
  scalars)``, if given, is called at every log step with the scalars of the progress line.
  """
  config = job.config
  # ===================================== Checks (no compute) ===================================
  logs.quiet_library_logs()
  workdir_lib.check_workdir(workdir)
  job.check_inputs(workdir)
  n_examples, total_steps, warmup_steps, steps_per_epoch = schedule_lib.resolve_schedule(config)
  end_step = schedule_lib.end_step(config, total_steps)
  try:   # before the mesh starts JAX's backend, unless main.py or the caller already did it
    logging.info("%s.", host_malloc.apply(config.get("host_malloc", "auto")))
  except OSError as e:
    raise ConfigError(str(e)) from None

  # ===================================== Workdir, writer and mesh ==============================
  workdir_path, writer, mesh = workdir_lib.open_workdir(config, workdir, job.plan.mesh_shape)

  # ===================================== Model (abstract), optimizer and shardings =============
  abstract_model = nnx.eval_shape(job.create_model)
  graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, job.trainable, ...)
  abstract_model.eval()
  graphdef_eval, _, _ = nnx.split(abstract_model, job.trainable, ...)
  workdir_lib.write_parameter_table(workdir_path, abstract_params, config.model,
                                    job.plan.model_config)
  schedule = job.make_schedule(total_steps, warmup_steps)
  tx = job.make_optimizer(schedule, abstract_params)
  sh = sharding_lib.state_shardings(mesh, abstract_params, abstract_rest, tx)
  logging.info("%d steps (%.1f epochs of %s examples at global batch %d), warmup %.1f steps, "
               "peak lr %.3g.", total_steps, total_steps / steps_per_epoch if n_examples else float("nan"),
               n_examples, config.batch_size, warmup_steps,
               getattr(schedule, "peak_lr", optim.peak_learning_rate(config.blr, config.batch_size)))
  setup = Setup(workdir=workdir_path, writer=writer, shardings=sh, graphdef_eval=graphdef_eval,
                abstract_model=abstract_model, total_steps=total_steps, end_step=end_step)

  # ===================================== Evaluators ============================================
  # Their data is read now, so a bad split stops the run before any compute.
  evaluators = job.evaluators(setup)

  # ===================================== Initialise or resume ==================================
  def restore(mgr, step):
    # The config must fit the checkpoint (checked on its meta alone, before any array is read).
    check_resume(state_lib.read_train_meta(mgr, step), config, job.plan.model_config, mgr.directory)
    _, a_params, a_rest = nnx.split(nnx.eval_shape(job.create_model), job.trainable, ...)
    return state_lib.restore_train_state(mgr, step, a_params, a_rest, sh, tx)

  ckpt_mgr, latest, restored = state_lib.restore_latest(
      lambda: state_lib.open_checkpoints(
          workdir, keep=config.get("keep_checkpoints", 3),
          keep_period=config.get("keep_period", 0) or None,
          async_save=config.get("async_checkpointing", True)),
      restore)
  try:                               # the manager is closed on every way out
    if latest is not None:
      params, opt_state, rest, start_step, resumed_meta = _resumed_state(
          config, restored, latest, evaluators, ckpt_mgr.directory)
    else:
      params, opt_state, rest = _initial_state(job, graphdef, sh, tx)
      start_step, resumed_meta = 0, {}
    bad_examples = int(resumed_meta.get("bad_examples", 0))

    # ===================================== The step ============================================
    step_keys = job.batch_keys + (data.BAD_KEY,)
    nonfinite = config.get("nonfinite", "stop")
    step_options, line = xla_cpu.choose(
        config, job.plan.model_config, job.plan.mesh_shape, forward_only=job.forward_only_step,
        batch_size=config.batch_size // config.grad_accum_steps)
    logging.info("Training step: %s.", line)
    dtype = xla_cpu.compute_dtype(job.plan.model_config)   # config.dtype "auto" resolved
    logging.info("Compute dtype: %s (%s).", dtype,
                 precision.resolve(config.get("dtype", "float32"))[1])

    def make_step(graphdef_):
      return build_train_step(
          graphdef=graphdef_, param_filter=job.trainable, loss_fn=job.loss, tx=tx,
          schedule=schedule, make_tx=lambda lr_fn: job.make_optimizer(lr_fn, abstract_params),
          shardings=sh, batch_size=config.batch_size, grad_accum_steps=config.grad_accum_steps,
          remat=config.get("remat", False), seed=config.seed,
          skip_nonfinite=nonfinite == "skip", batch_keys=step_keys,
          prepare=lambda batch, step: job.prepare(setup, batch, step),
          compiler_options=step_options)

    train_step = make_step(graphdef)
    recovery = None
    if nonfinite == "rollback":
      # The float32 step exists only once a rollback asks for it: the same state trees (parameters
      # are float32 in both), a graph whose compute dtype is float32.
      recovery = Rollback(
          dtype=dtype, fp32_steps=config.get("rollback_fp32_steps", 0),
          max_rollbacks=config.get("max_rollbacks", 3),
          restore=lambda step: restore(ckpt_mgr, step),
          initial_state=lambda: _initial_state(job, graphdef, sh, tx),
          build_fp32_step=lambda: make_step(nnx.split(
              nnx.eval_shape(lambda: job.create_model("float32")), job.trainable, ...)[0]),
          writer=writer, meta=resumed_meta)

    # ===================================== Data ================================================
    result = TrainResult(step=start_step, losses={}, model=None, workdir=str(workdir))
    if recovery is not None:
      result.rollbacks = recovery.total
    if start_step >= end_step:
      logging.info("Nothing to do: step %d already reached (end step %d).", start_step, end_step)
      result.model = nnx.merge(graphdef_eval, params, rest)
      return result

    def make_batches(step: int):
      return input_pipeline.DevicePrefetcher(job.train_data(step), sh.batch,
                                             prefetch=config.get("prefetch", 2))

    # ===================================== The steps ===========================================
    window = MetricsWindow(
        writer=writer, total_steps=total_steps, batch_size=config.batch_size,
        start_step=start_step, steps_per_epoch=steps_per_epoch if n_examples else None,
        last_checkpoint=lambda: f"step {ckpt_mgr.latest_step()} in {ckpt_mgr.directory}",
        on_log=on_log, nonfinite=nonfinite,
        max_consecutive_skips=config.get("max_consecutive_skips", 10),
        max_bad_fraction=config.get("max_bad_fraction", 1.0), bad_examples=bad_examples,
        min_examples_for_bad_check=min_examples_for_bad_check(config, n_examples))
    logging.info("Training steps %d..%d of %d (global batch %d)%s.", start_step + 1, end_step,
                 total_steps, config.batch_size,
                 "".join(f"; {e.description}" for e in evaluators if e.description))
    params, rest = _steps(job, setup, ckpt_mgr, train_step, step_keys, make_batches, window,
                          evaluators, (params, opt_state, rest), result, recovery)
  finally:
    ckpt_mgr.close()

  result.model = nnx.merge(graphdef_eval, params, rest)
  if result.stopped_by is not None:
    logging.warning("Stopped by %s at step %d of %d with a checkpoint in %s; run the same command "
                    "again to resume.", result.stopped_by, result.step, total_steps,
                    workdir_path / "checkpoints")
  if result.losses:                  # none when a stop request met a rollback to the start step
    job.summary(result, setup)
  return result


def _steps(job: Job, setup: Setup, ckpt_mgr, train_step, step_keys, make_batches,
           window: MetricsWindow, evaluators: list[Evaluator], train_state, result: TrainResult,
           recovery: Rollback | None = None):
  """Steps ``result.step + 1 .. setup.end_step``: the progress line, the evaluators that are due,
  checkpoints, the bad-record check, a stop request, and (``recovery``, nonfinite="rollback") the
  way back to the last checkpoint after a non-finite step. ``make_batches(step)`` opens the device
  batches from ``step`` on. Fills ``result``; returns (params, rest)."""
  config = job.config
  params, opt_state, rest = train_state
  model_meta = {"model_name": config.model, "model_kwargs": job.plan.model_config.to_dict()}
  if recovery is not None:
    window.rollbacks = recovery.total

  def save(step: int):
    window.fetch()                   # never checkpoint past a non-finite loss
    meta = {**model_meta, "step": step, "seed": config.seed, "batch_size": config.batch_size,
            "data_position": step, "dataset": config.dataset, "total_steps": setup.total_steps,
            **job.checkpoint_meta()}
    for evaluator in evaluators:
      meta.update(evaluator.state())
    meta["bad_examples"] = window.bad_examples
    if recovery is not None:
      meta.update(recovery.meta())
      recovery.saved()
    state_lib.save_train_state(ckpt_mgr, step, params, rest, opt_state, meta)

  profiler = Profiler(config, setup.workdir)
  watchdog = peers.PeerWatchdog(config.get("peer_timeout_s", 120),
                                peers.finished_steps_text(ckpt_mgr.directory))
  batches = make_batches(result.step)
  with watchdog:                     # a lost peer ends the run within peer_timeout_s
    try:
      with StopRequest() as stop:
        step = result.step
        while step < setup.end_step:
          done = step + 1            # updates finished after this iteration
          try:
            batch = window.next_batch(batches)
            window.note_bad_examples(done, batch.get(input_pipeline.DevicePrefetcher.HOST, {}))
            step_fn = train_step if recovery is None else recovery.step_for(done, train_step)
            params, opt_state, rest, metrics = step_fn(
                params, opt_state, rest, {k: batch[k] for k in step_keys}, np.int32(step))
            window.add(done, metrics)
            profiler(done, metrics)
            result.stopped_by = stop.requested(done, ckpt_mgr)
            result.step = done
            stopping = result.stopped_by is not None
            is_last = done == setup.end_step or stopping

            if done % config.log_every_steps == 0 or is_last:
              result.losses[done] = window.log(done)["loss"]

            due = [e for e in evaluators
                   if e.due(done, end_step=setup.end_step, stopping=stopping)]
            if due:
              window.fetch()         # never evaluate past a non-finite loss
              for evaluator in due:
                scalars = evaluator(done, params, rest)
                if scalars:
                  result.metrics.setdefault(done, {}).update(scalars)
              window.restart(done)   # evaluation time is not training throughput

            checkpoint_due = done % config.checkpoint_every_steps == 0 or is_last
            if checkpoint_due:
              save(done)
            problem = window.bad_records_problem()
            if problem is not None:  # too many undecodable records: stop with a checkpoint
              if not checkpoint_due:
                save(done)
              raise BadRecordsError(f"{problem} A checkpoint of step {done} is in "
                                    f"{ckpt_mgr.directory}.")
          except RollbackRequest as bad:
            if recovery is None:     # the window raises it only under nonfinite="rollback"
              raise
            params = opt_state = rest = None   # the non-finite state goes before the restore
            batches.close()
            ckpt_mgr.wait_until_finished()     # an asynchronous save of a finite step lands first
            params, opt_state, rest, meta, step = recovery(bad, ckpt_mgr.latest_step(),
                                                           ckpt_mgr.directory)
            window.rewind(step, bad_examples=int(meta.get("bad_examples", 0)))
            window.rollbacks = recovery.total
            for evaluator in evaluators:
              evaluator.restore(meta)
            # What the steps after the checkpoint logged is computed again (or, at a stop, is not
            # part of the run any more).
            result.losses = {s: v for s, v in result.losses.items() if s <= step}
            result.metrics = {s: v for s, v in result.metrics.items() if s <= step}
            result.step = step
            result.rollbacks, result.rolled_back = recovery.total, list(recovery.events)
            if result.stopped_by is not None:
              # Asked to stop: the checkpoint restored is the one a rerun resumes from.
              break
            batches = make_batches(step)
            continue
          if stopping:
            break
          step = done
    finally:
      result.skipped_steps = list(window.skipped_steps)
      result.bad_examples = window.bad_examples
      profiler.close()
      window.close()
      batches.close()
      ckpt_mgr.wait_until_finished()
      setup.writer.flush()
  return params, rest


def _resumed_state(config, restored, latest: int, evaluators: list[Evaluator], directory):
  """(params, opt_state, rest, start_step, meta) of a restored checkpoint; the evaluators take back
  their state."""
  params, opt_state, rest, meta = restored
  start_step = int(meta.get("step", latest))
  for evaluator in evaluators:
    evaluator.restore(meta)
  if meta.get("seed", config.seed) != config.seed or \
      meta.get("batch_size", config.batch_size) != config.batch_size:
    logging.warning("Resuming step %d written with seed=%s batch_size=%s, now seed=%s "
                    "batch_size=%s (config.allow_resume_changes): the continuation differs from "
                    "the original run.", start_step, meta.get("seed"), meta.get("batch_size"),
                    config.seed, config.batch_size)
  logging.info("Resumed from %s at step %d.", directory, start_step)
  return params, opt_state, rest, start_step, meta


def _initial_state(job: Job, graphdef, sh: sharding_lib.StateShardings, tx):
  """(params, opt_state, rest) of a fresh run: random init on the shardings, then the job's
  starting weights."""

  def init():
    _, p, r = nnx.split(job.create_model(), job.trainable, ...)
    return p, r

  params, rest = jax.jit(init, out_shardings=(sh.params, sh.rest))()
  model = nnx.merge(graphdef, params, rest)
  job.initialise(model)
  _, params, rest = nnx.split(model, job.trainable, ...)
  opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(params)
  return params, opt_state, rest
