"""Evaluating a ConvViT classifier, for the command line:

    python main.py --config=configs/evaluate.py[:size] --workdir=DIR

The config is `convmae_jax.configs.evaluate` (convmae_jax/configs/evaluate.py: recipe, commands,
expected results); this file only gives it a path for ``--config``, which loads it by path.
"""

from convmae_jax.configs.evaluate import get_config  # noqa: F401
