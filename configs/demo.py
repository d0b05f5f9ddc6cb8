"""A tiny ConvMAE on the embedded photos, for the command line:

    python main.py --config=configs/demo.py --workdir=DIR

The config is `convmae_jax.configs.demo` (convmae_jax/configs/demo.py: recipe, commands, expected
results); this file only gives it a path for ``--config``, which loads it by path.
"""

from convmae_jax.configs.demo import get_config  # noqa: F401
