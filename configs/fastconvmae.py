"""FastConvMAE pretraining (complementary masks), for the command line:

    python main.py --config=configs/fastconvmae.py --workdir=DIR

The config is `convmae_jax.configs.fastconvmae` (convmae_jax/configs/fastconvmae.py: recipe,
commands, expected results); this file only gives it a path for ``--config``, which loads it by path.
"""

from convmae_jax.configs.fastconvmae import get_config  # noqa: F401
