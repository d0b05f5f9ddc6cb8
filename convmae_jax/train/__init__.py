"""Training: every job on one loop.

    from convmae_jax.train import train_and_evaluate
    result = train_and_evaluate(config, workdir)   # config: configs/pretrain.py, finetune.py, ...

From the top down: ``trainer`` picks the job; ``jobs/`` say what each job does differently;
``loop`` runs any of them; ``evaluators/`` judge the model while it trains; below them the step
(``step``), the metrics window (``metrics``), training-state checkpoints (``state``), stop requests
(``stop``), lost peers (``peers``), the run's folder (``workdir``), schedules, optimizers, shardings,
losses, mixup, random streams (``rng``), config checks (``validation``) and errors.
"""

from convmae_jax.train.errors import BadRecordsError, ConfigError, NonFiniteLossError
from convmae_jax.train.loop import TrainResult
from convmae_jax.train.trainer import train_and_evaluate
from convmae_jax.train.validation import validate_config

__all__ = ["BadRecordsError", "ConfigError", "NonFiniteLossError", "TrainResult",
           "train_and_evaluate", "validate_config"]
