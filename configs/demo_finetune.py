"""Fine-tuning the demo encoder on the embedded digits, for the command line:

    python main.py --config=configs/demo_finetune.py --workdir=DIR

The config is `convmae_jax.configs.demo_finetune` (convmae_jax/configs/demo_finetune.py: recipe,
commands, expected results); this file only gives it a path for ``--config``, which loads it by
path.
"""

from convmae_jax.configs.demo_finetune import get_config  # noqa: F401
