"""ConvMAE pretraining models, ConvViT classifiers and ConvViT detection/segmentation backbones.

    from flax import nnx
    from convmae_jax import models
    model = models.create("convmae_base", rngs=nnx.Rngs(0), img_size=224, norm_pix_loss=True)
    loss, pred, mask = model(images, noise=noise)
    clf = models.create("convvit_base", rngs=nnx.Rngs(0), num_classes=1000)
    det = models.create("convvit_det_base", rngs=nnx.Rngs(0))     # also convvit_seg_*, convvit_vitdet_*
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from convmae_jax.models.backbone import ConvViTBackbone, relative_position_index
from convmae_jax.models.config import (BACKBONE_PRESETS, BackboneConfig, ConvMAEConfig,
                                       ConvViTConfig, EncoderConfig, SIZES, DECODER_SIZES,
                                       backbone_defaults, make_config)
from convmae_jax.models.convmae import ConvMAE, masked_patch_loss, patchify, unpatchify
from convmae_jax.models.convvit import ConvViT, drop_path_rates
from convmae_jax.models.layers import FrozenPosEmbed
from convmae_jax.models.masking import random_masking, upsample_mask, num_visible
from convmae_jax.models.pos_embed import resize_pos_embed, sincos_2d
from convmae_jax.models.upernet import HeadConfig, Segmentor, create_segmentor

_FAMILIES = {"convmae": (ConvMAE, ConvMAEConfig), "convvit": (ConvViT, ConvViTConfig),
             **{f"convvit_{p}": (ConvViTBackbone, BackboneConfig) for p in BACKBONE_PRESETS}}


def names() -> list[str]:
  """Every registered model name, e.g. 'convmae_base', 'convvit_tiny', 'convvit_det_base'."""
  return [f"{fam}_{size}" for fam in _FAMILIES for size in SIZES]


def _split_name(name: str) -> tuple[str, str]:
  fam, _, size = name.rpartition("_")
  if fam not in _FAMILIES or size not in SIZES:
    raise ValueError(f"unknown model {name!r}; accepted: {names()}")
  return fam, size


def family(name: str) -> str:
  """'convmae', 'convvit' (classifier) or 'convvit_det' / 'convvit_seg' / 'convvit_vitdet'."""
  return _split_name(name)[0]


def config_for(name: str, **overrides: Any):
  """The validated config dataclass of `name` with field overrides applied."""
  fam, size = _split_name(name)
  cls = _FAMILIES[fam][1]
  if cls is BackboneConfig:
    defaults = backbone_defaults(fam[len("convvit_"):], size)
  else:
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
    "BACKBONE_PRESETS", "BackboneConfig", "ConvViTBackbone", "relative_position_index",
    "ConvMAE", "ConvViT", "ConvMAEConfig", "ConvViTConfig", "EncoderConfig", "FrozenPosEmbed",
    "SIZES", "DECODER_SIZES", "config_for", "family", "count_params", "create", "drop_path_rates",
    "masked_patch_loss", "names", "num_visible", "patchify", "random_masking", "resize_pos_embed",
    "sincos_2d", "unpatchify", "upsample_mask", "HeadConfig", "Segmentor", "create_segmentor",
]
