"""What the labelled evaluators share: when they run, and the best model so far.

:class:`BestModelEvaluator` is due every ``every_steps`` steps (0: at the end only) and at the last
step; it keeps the best model so far by one score as a model-only checkpoint (step 0 of
``best_dir``, replaced when the score improves), and the best score travels in the training
checkpoints' meta under ``meta_key`` so that a resumed run keeps comparing against it. A subclass
computes and logs its scores and calls :meth:`improves` and :meth:`keep_best`.
"""

from __future__ import annotations

from flax import nnx

from convmae_jax import checkpoints


class BestModelEvaluator:
  """Base of ``TopKEvaluator`` (best by top-1) and ``SegmentationEvaluator`` (best by mIoU)."""

  meta_key: str = ""                    # e.g. "best_top1": the checkpoint meta field

  def __init__(self, *, eval_data, every_steps: int, graphdef_eval, shardings, writer, best_dir,
               best_meta: dict):
    self.eval_data = eval_data
    self.every_steps = every_steps
    self.graphdef_eval = graphdef_eval
    self.batch_sharding = shardings.batch
    self.writer = writer
    self.best_dir = best_dir
    self.best_meta = best_meta
    self.best = -1.0

  def period(self) -> str:
    return f"every {self.every_steps if self.every_steps > 0 else '(end only)'} steps"

  def due(self, step: int, *, end_step: int, stopping: bool) -> bool:
    del stopping
    return (self.every_steps > 0 and step % self.every_steps == 0) or step == end_step

  def improves(self, score: float) -> bool:
    """Whether ``score`` beats the best so far (which it then becomes)."""
    improved = score > self.best
    self.best = max(self.best, score)
    return improved

  def keep_best(self, step: int, params, rest, evaluation: dict) -> None:
    """The model of ``step`` as the best one, its ``evaluation`` in the meta."""
    model = nnx.merge(self.graphdef_eval, params, rest)
    checkpoints.save_model(self.best_dir, model, {**self.best_meta, "step": step,
                                                  "eval": evaluation}, step=0, overwrite=True)

  def state(self) -> dict:
    return {self.meta_key: self.best}

  def restore(self, meta: dict) -> None:
    self.best = float(meta.get(self.meta_key, -1.0))
