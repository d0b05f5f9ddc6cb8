"""ConvMAE pretraining, the official recipe, for the command line:

    python main.py --config=configs/pretrain.py[:size] --workdir=DIR

The config is `convmae_jax.configs.pretrain` (convmae_jax/configs/pretrain.py: recipe, commands,
expected results); this file only gives it a path for ``--config``, which loads it by path.
"""

from convmae_jax.configs.pretrain import get_config  # noqa: F401
