"""A tiny ConvMAE pretrained on the embedded digits (labels unused), for the command line:

    python main.py --config=configs/demo_digits.py --workdir=DIR

The config is `convmae_jax.configs.demo_digits` (convmae_jax/configs/demo_digits.py: recipe,
commands, expected results); this file only gives it a path for ``--config``, which loads it by
path.
"""

from convmae_jax.configs.demo_digits import get_config  # noqa: F401
