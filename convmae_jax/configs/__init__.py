"""Configs as code: each module has ``get_config(arg)`` returning an ``ml_collections.ConfigDict``.

  pretrain        ConvMAE pretraining on ImageNet-1k, the official recipe (arg: model size)
  fastconvmae     FastConvMAE pretraining (complementary masks), its published recipe (arg: size)
  demo            a tiny ConvMAE on the embedded photos, about a minute on a CPU
  demo_digits     a tiny ConvMAE on the embedded digits (labels unused), k-NN monitor on them
  finetune        fine-tuning a pretrained encoder (ConvViT) on ImageNet-1k (arg: model size)
  linprobe        linear probing of a pretrained encoder on ImageNet-1k (arg: model size)
  evaluate        top-1/top-5/loss of a classifier on a split (arg: model size)
  demo_finetune   fine-tuning the demo encoder on the embedded digits
  demo_linprobe   linear probing of the demo encoder on the embedded digits
  segment         UperNet semantic segmentation on ADE20K (scene_parse150), official recipe (arg: size)
  demo_segment    UperNet on the embedded digits-on-photos segmentation demo

On the command line they are the files of the repository's ``configs/`` folder
(``python main.py --config=configs/pretrain.py:large ...``), which re-export these modules. In
Python, e.g. a notebook::

  from convmae_jax import configs
  cfg = configs.get_config("demo")             # or configs.get_config("finetune", "large")
  from convmae_jax.configs import finetune     # the module itself
"""

from __future__ import annotations

import importlib

import ml_collections

NAMES = ("pretrain", "fastconvmae", "demo", "demo_digits", "finetune", "linprobe", "evaluate",
         "demo_finetune", "demo_linprobe", "segment", "demo_segment")


def get_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """``convmae_jax.configs.<name>.get_config(arg)``; ``name`` is one of `NAMES`."""
  if name not in NAMES:
    # Checked before importing: `name` never reaches import_module unless it is a known module.
    raise ValueError(f"Unknown config {name!r}; available: {', '.join(NAMES)}")
  return importlib.import_module(f"{__name__}.{name}").get_config(arg)
