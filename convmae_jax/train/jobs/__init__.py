"""The jobs ``config.job`` names, each a small module that tells the loop (``train/loop.py``) what
differs: ``pretrain`` (ConvMAE), ``classify`` (fine-tuning and linear probing of ConvViT) and
``evaluate`` (a classifier checkpoint scored on a split, no training)."""
