"""Fine-tuning a pretrained encoder (ConvViT), the official recipe, for the command line:

    python main.py --config=configs/finetune.py[:size] --workdir=DIR

The config is `convmae_jax.configs.finetune` (convmae_jax/configs/finetune.py: recipe, commands,
expected results); this file only gives it a path for ``--config``, which loads it by path.
"""

from convmae_jax.configs.finetune import get_config  # noqa: F401
