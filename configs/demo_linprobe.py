"""Linear probing of the demo encoder on the embedded digits, for the command line:

    python main.py --config=configs/demo_linprobe.py --workdir=DIR

The config is `convmae_jax.configs.demo_linprobe` (convmae_jax/configs/demo_linprobe.py: recipe,
commands, expected results); this file only gives it a path for ``--config``, which loads it by
path.
"""

from convmae_jax.configs.demo_linprobe import get_config  # noqa: F401
