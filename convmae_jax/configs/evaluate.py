r"""Evaluating a ConvViT classifier: top-1, top-5 and loss on a split, printed and written to
``{workdir}/eval_{split}.json``.

    python main.py --config=configs/evaluate.py --workdir=$HOME/runs/eval \
      --config.init_from=$HOME/runs/convvit_base_ft/best      # ours (fine-tuning's best checkpoint)
      # --config.init_from=convvit_base_finetuned.pth         # an official fine-tuned checkpoint

Expected result for the official fine-tuned ConvMAE-B: 84.98% top-1 / 97.15% top-5 on ImageNet-1k
validation (resize 256 bicubic, center crop 224). ``configs/evaluate.py:large`` picks another size.
"""

import ml_collections

from convmae_jax.configs import finetune


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Evaluation config; ``arg`` is the model size (default "base")."""
  c = finetune.get_config(arg)
  c.job = "evaluate"
  c.dtype = "float32"
  return c
