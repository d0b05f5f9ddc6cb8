"""segment config for the command line: python main.py --config=configs/segment.py --workdir=DIR

The config is `convmae_jax.configs.segment` (recipe, commands, expected results); this file only gives
it a path for ``--config``.
"""

from convmae_jax.configs.segment import get_config  # noqa: F401
