"""Linear probing of a pretrained encoder, the official recipe, for the command line:

    python main.py --config=configs/linprobe.py[:size] --workdir=DIR

The config is `convmae_jax.configs.linprobe` (convmae_jax/configs/linprobe.py: recipe, commands,
expected results); this file only gives it a path for ``--config``, which loads it by path.
"""

from convmae_jax.configs.linprobe import get_config  # noqa: F401
