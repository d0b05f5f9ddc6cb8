"""ConvMAE pretraining: the loop, optimizer, sharding rules and config checks.

    from convmae_jax.train import train_and_evaluate
    result = train_and_evaluate(config, workdir)   # config: configs/pretrain.py or configs/demo.py
"""

from convmae_jax.train.trainer import TrainResult, train_and_evaluate
from convmae_jax.train.errors import ConfigError
from convmae_jax.train.validation import validate_config

__all__ = ["ConfigError", "TrainResult", "train_and_evaluate", "validate_config"]
