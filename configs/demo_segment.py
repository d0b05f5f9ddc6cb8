"""demo_segment config for the command line: python main.py --config=configs/demo_segment.py --workdir=DIR

The config is `convmae_jax.configs.demo_segment` (recipe, commands, expected results); this file only gives
it a path for ``--config``.
"""

from convmae_jax.configs.demo_segment import get_config  # noqa: F401
