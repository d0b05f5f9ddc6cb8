"""The entry point of every job: ``train_and_evaluate(config, workdir)`` runs ``config.job``.

    pretrain            jobs/pretrain.py   ConvMAE masked-image pretraining
    finetune, linprobe  jobs/classify.py   ConvViT fine-tuning / linear probing from a checkpoint
    evaluate            jobs/evaluate.py   a classifier checkpoint scored on a split
    segment             jobs/segment.py    UperNet semantic segmentation from a checkpoint (mIoU)

The training jobs run the one loop in ``loop.py``; each job module says only what differs.
"""

from __future__ import annotations

from convmae_jax.train.jobs import evaluate
from convmae_jax.train.jobs.classify import Classify
from convmae_jax.train.jobs.pretrain import Pretrain
from convmae_jax.train.jobs.segment import Segment
from convmae_jax.train.loop import TrainResult, run


def train_and_evaluate(config, workdir: str, *, on_log=None) -> TrainResult:
  """Runs the job ``config.job`` (default "pretrain") in ``workdir``, resuming from its checkpoints.

  ``on_log(step, scalars)``, if given, is called at every log step with the scalars of the
  progress line (loss, learning_rate, grad_norm, images_per_sec, ...), e.g. for a live plot.
  Raises ConfigError (a value that is not accepted, before any compute), NonFiniteLossError or
  BadRecordsError (``convmae_jax.train.errors``).
  """
  job = config.get("job", "pretrain")
  if job == "pretrain":
    return run(Pretrain(config), workdir, on_log=on_log)
  if job == "evaluate":
    return evaluate.run(config, workdir)
  if job == "segment":
    return run(Segment(config), workdir, on_log=on_log)
  return run(Classify(config), workdir, on_log=on_log)   # refuses a job it does not know
