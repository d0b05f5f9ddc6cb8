"""ConvMAE pretraining models and ConvViT classifiers.

    from flax import nnx
    from convmae_jax import models
    model = models.create("convmae_base", rngs=nnx.Rngs(0), img_size=224, norm_pix_loss=True)
    loss, pred, mask = model(images, noise=noise)
    clf = models.create("convvit_base", rngs=nnx.Rngs(0), num_classes=1000)
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from convmae_jax.models.config import (ConvMAEConfig, ConvViTConfig, EncoderConfig, SIZES,
                                       DECODER_SIZES, make_config)
from convmae_jax.models.convmae import ConvMAE, masked_patch_loss, patchify, unpatchify
from convmae_jax.models.convvit import ConvViT, drop_path_rates
from convmae_jax.models.layers import FrozenPosEmbed
from convmae_jax.models.masking import random_masking, upsample_mask, num_visible
from convmae_jax.models.pos_embed import resize_pos_embed, sincos_2d

_FAMILIES = {"convmae": (ConvMAE, ConvMAEConfig), "convvit": (ConvViT, ConvViTConfig)}


def names() -> list[str]:
  """Every registered model name, e.g. 'convmae_base', 'convvit_tiny'."""
  return [f"{fam}_{size}" for fam in _FAMILIES for size in SIZES]


def _split_name(name: str) -> tuple[str, str]:
  fam, _, size = name.partition("_")
  if fam not in _FAMILIES or size not in SIZES:
    raise ValueError(f"unknown model {name!r}; accepted: {names()}")
  return fam, size


def config_for(name: str, **overrides: Any):
  """The validated config dataclass of `name` with field overrides applied."""
  fam, size = _split_name(name)
  cls = _FAMILIES[fam][1]
  defaults = dict(SIZES[size])
  if fam == "convmae":
    defaults.update(DECODER_SIZES[size])
  return make_config(cls, defaults, overrides)


def create(name: str, *, rngs: nnx.Rngs, **overrides: Any):
  """Builds a model by registry name with config-field overrides (img_size, mask_ratio, ...)."""
  fam, _ = _split_name(name)
  return _FAMILIES[fam][0](config_for(name, **overrides), rngs=rngs)


def count_params(model: nnx.Module, variable_type=nnx.Param) -> int:
  """Number of scalars in the model's variables of `variable_type` (trainable: nnx.Param)."""
  import jax
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, variable_type)))


__all__ = [
    "ConvMAE", "ConvViT", "ConvMAEConfig", "ConvViTConfig", "EncoderConfig", "FrozenPosEmbed",
    "SIZES", "DECODER_SIZES", "config_for", "count_params", "create", "drop_path_rates",
    "masked_patch_loss", "names", "num_visible", "patchify", "random_masking", "resize_pos_embed",
    "sincos_2d", "unpatchify", "upsample_mask",
]
