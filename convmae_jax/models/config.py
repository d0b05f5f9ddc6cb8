"""Model configurations: one dataclass per model family and the size table.

Every grid is derived from `img_size` and `patch_sizes`; nothing assumes 224 pixels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_DWCONV_IMPLS = ("auto", "shift", "lax")
_ATTENTION_IMPLS = ("auto", "explicit", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Fields shared by the pretraining model and the classifier.

  img_size: input height = width in pixels; must be a multiple of prod(patch_sizes).
  patch_sizes: stride of patch_embed1/2/3 (official (4, 2, 2): stage grids at strides 4, 8, 16).
  embed_dims / depths / mlp_ratios: per stage (stages 1–2 conv blocks, stage 3 transformer).
  num_heads: attention heads of stage 3.
  dtype: compute dtype, "float32" or "bfloat16" (parameters, LayerNorm, softmax, loss stay float32).
  dwconv_impl: depthwise conv implementation: "shift" (fast on CPU), "lax" (grouped conv, fast on
    GPU/TPU) or "auto" (picks by backend). All give the same function.
  attention_impl: how every attention layer (encoder, decoder, backbone) is computed, the same
    function up to rounding: "explicit" (matmuls written out, softmax in float32), "xla" or "cudnn"
    (`jax.nn.dot_product_attention` with that implementation; "cudnn" is cuDNN flash attention,
    CUDA GPUs and bfloat16 only) or "auto": "cudnn" on a CUDA GPU in bfloat16 where cuDNN takes the
    shapes, else "explicit" (`transformer.resolve_attention_impl`).
  """
  img_size: int = 224
  in_chans: int = 3
  patch_sizes: tuple[int, int, int] = (4, 2, 2)
  embed_dims: tuple[int, int, int] = (256, 384, 768)
  depths: tuple[int, int, int] = (2, 2, 11)
  num_heads: int = 12
  mlp_ratios: tuple[float, float, float] = (4.0, 4.0, 4.0)
  dtype: str = "float32"
  dwconv_impl: str = "auto"
  attention_impl: str = "auto"

  @property
  def total_stride(self) -> int:
    return math.prod(self.patch_sizes)

  @property
  def grid_sizes(self) -> tuple[int, int, int]:
    """Side of the stage-1, stage-2 and stage-3 (token) grids."""
    p1, p2, p3 = self.patch_sizes
    return (self.img_size // p1, self.img_size // (p1 * p2), self.img_size // (p1 * p2 * p3))

  @property
  def num_patches(self) -> int:
    return self.grid_sizes[2] ** 2

  @property
  def jnp_dtype(self):
    return _DTYPES[self.dtype]

  def validate(self) -> None:
    """Raises ValueError naming the bad value and what is accepted."""
    for name in ("patch_sizes", "embed_dims", "depths", "mlp_ratios"):
      value = getattr(self, name)
      if len(value) != 3:
        raise ValueError(f"{name} must have 3 entries (one per stage), got {value!r}")
    if any(int(p) < 1 for p in self.patch_sizes):
      raise ValueError(f"patch_sizes must be positive, got {self.patch_sizes}")
    stride = self.total_stride
    if not isinstance(self.img_size, int) or self.img_size <= 0 or self.img_size % stride:
      lower = (int(self.img_size) // stride) * stride if isinstance(self.img_size, (int, float)) else 0
      near = [v for v in (lower, lower + stride) if v > 0]
      raise ValueError(
          f"img_size {self.img_size!r} is not a positive multiple of the total patch stride {stride} "
          f"(patch_sizes {tuple(self.patch_sizes)}); nearest accepted: {near}")
    if self.in_chans < 1:
      raise ValueError(f"in_chans must be >= 1, got {self.in_chans}")
    if self.embed_dims[2] % self.num_heads:
      raise ValueError(f"embed_dims[2]={self.embed_dims[2]} is not divisible by num_heads={self.num_heads}")
    if self.embed_dims[2] % 4:
      raise ValueError(f"embed_dims[2]={self.embed_dims[2]} must be a multiple of 4 (2-D sin-cos embedding)")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype {self.dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    if self.dwconv_impl not in _DWCONV_IMPLS:
      raise ValueError(f"dwconv_impl {self.dwconv_impl!r} is not one of {_DWCONV_IMPLS}")
    if self.attention_impl not in _ATTENTION_IMPLS:
      raise ValueError(f"attention_impl {self.attention_impl!r} is not one of {_ATTENTION_IMPLS}")

  def to_dict(self) -> dict[str, Any]:
    """JSON-able kwargs: `type(cfg)(**cfg.to_dict())` rebuilds it."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class ConvMAEConfig(EncoderConfig):
  """Pretraining model. decoder_mlp_ratio None = mlp_ratios[0] (the official rule).

  mask_ratio: fraction of tokens removed, in (0, 1); visible = int(L·(1 − mask_ratio)).
  norm_pix_loss: regress per-patch normalized pixels (the documented recipe; official code default
    is False).
  conv_impl: how stages 1–2 are computed, with identical results: "visible" runs them on the
    visible tokens' cells only (about a quarter of the work at mask ratio 0.75), "dense" on the full
    maps with the mask multiplied in, as the official code does.
  """
  decoder_embed_dim: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  decoder_mlp_ratio: float | None = None
  mask_ratio: float = 0.75
  norm_pix_loss: bool = True
  conv_impl: str = "visible"
  complementary_masks: bool = False

  @property
  def num_groups(self) -> int:
    """Complementary visible groups per image (1 without complementary masks)."""
    if not self.complementary_masks:
      return 1
    return int(round(1.0 / (1.0 - float(self.mask_ratio))))

  def validate(self) -> None:
    super().validate()
    if not 0.0 < float(self.mask_ratio) < 1.0:
      raise ValueError(f"mask_ratio {self.mask_ratio!r} must lie strictly between 0 and 1")
    if int(self.num_patches * (1 - self.mask_ratio)) < 1:
      raise ValueError(f"mask_ratio {self.mask_ratio} leaves no visible token of {self.num_patches}")
    if self.decoder_embed_dim % self.decoder_num_heads or self.decoder_embed_dim % 4:
      raise ValueError(
          f"decoder_embed_dim {self.decoder_embed_dim} must be divisible by decoder_num_heads "
          f"{self.decoder_num_heads} and by 4")
    if self.conv_impl not in ("visible", "dense"):
      raise ValueError(f"conv_impl {self.conv_impl!r} is not one of ('visible', 'dense')")
    if self.complementary_masks:
      k = 1.0 / (1.0 - float(self.mask_ratio))
      groups = int(round(k))
      if abs(k - groups) > 1e-6 or groups < 2:
        raise ValueError(
            f"complementary_masks needs 1/(1 - mask_ratio) to be an integer >= 2; mask_ratio "
            f"{self.mask_ratio} gives {k:.4g}. Accepted ratios: 0.5, 0.6667, 0.75, 0.8, 0.8333, ...")
      visible_count = int(self.num_patches * (1 - self.mask_ratio))
      if self.num_patches % groups or self.num_patches // groups != visible_count:
        raise ValueError(
            f"complementary_masks splits the {self.num_patches} tokens (img_size {self.img_size}) "
            f"into {groups} equal groups of visible tokens, but {self.num_patches} tokens at "
            f"mask_ratio {self.mask_ratio} give {visible_count} visible tokens, not "
            f"{self.num_patches}/{groups}; pick an img_size whose token count is a multiple of "
            f"{groups} (and the exact ratio 1 - 1/{groups})")


@dataclasses.dataclass(frozen=True)
class ConvViTConfig(EncoderConfig):
  """Classifier. global_pool: mean of stage-3 tokens → fc_norm → head (True, official fine-tune
  default) or norm → first token → head (False). drop_path_rate is spread linearly over all blocks.
  head_batchnorm: BatchNorm without affine (eps 1e-6) between the pooled features and the head, as
  the official linear probe adds it.
  """
  num_classes: int = 1000
  global_pool: bool = True
  drop_path_rate: float = 0.1
  head_batchnorm: bool = False

  def validate(self) -> None:
    super().validate()
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"drop_path_rate {self.drop_path_rate} must lie in [0, 1)")


_REL_POS_KINDS = ("shared_table", "per_block_table", "decomposed", "none")
_POS_EMBED_KINDS = ("frozen", "trainable", "interpolate")
_STRIDE32_KINDS = ("maxpool", "conv_bn_gelu", "none")


@dataclasses.dataclass(frozen=True)
class BackboneConfig(EncoderConfig):
  """Detection / segmentation backbone: the ConvViT encoder with local window attention in stage 3
  and a pyramid of stride 4, 8, 16 (and 32) maps. Defaults = the detectron2 backbone (spec §5.1).

  img_size: the (square) input side in pixels, a multiple of prod(patch_sizes); with windows that
    are not padded the stage-3 grid must also divide by window_size.
  global_blocks: stage-3 block indices (0-based) with global attention; the others attend within
    window_size × window_size token windows.
  window_size: window side in stage-3 tokens.
  window_padding: pad the grid with zero tokens up to a multiple of window_size (ViTDet) instead
    of refusing grids that do not divide.
  rel_pos: relative position term added to the attention scores —
    "shared_table": one zero-initialised BEiT table shared by all windowed blocks and one by all
      global blocks (`windowed_rel_pos_bias`, `global_rel_pos_bias`);
    "per_block_table": one table per block (`blocks3.i.attn.relative_position_bias_table`);
    "decomposed": ViTDet's per-block `rel_pos_h` / `rel_pos_w` (head_dim wide);
    "none".
  layer_scale: initial value of per-channel gammas on both branches of each block, None = none.
  pos_embed: "frozen" (stored at the model's token grid, not trained), "trainable" (same, trained)
    or "interpolate" (stored at the pretraining grid, pretrain_img_size / 16, and resized bicubic
    to the token grid at every forward).
  out_stride32: the fourth output: "maxpool" (2×2 max pool of the stride-16 map), "conv_bn_gelu"
    (3×3 stride-2 unpadded conv → BatchNorm → GELU) or "none" (three outputs).
  cblock_norm_eps: LayerNorm eps of the conv blocks (1e-5 official, 1e-6 in the ViTDet port).
  drop_path_rate: spread linearly over all blocks of all stages.
  remat: recompute each block in the backward pass instead of keeping its activations.
  """
  img_size: int = 1024
  global_blocks: tuple[int, ...] = (0, 3, 6, 10)
  window_size: int = 16
  window_padding: bool = False
  rel_pos: str = "shared_table"
  layer_scale: float | None = None
  pos_embed: str = "frozen"
  pretrain_img_size: int = 224
  out_stride32: str = "maxpool"
  cblock_norm_eps: float = 1e-5
  drop_path_rate: float = 0.1
  remat: bool = False

  def is_global(self, index: int) -> bool:
    return index in self.global_blocks

  @property
  def pretrain_grid(self) -> int:
    return self.pretrain_img_size // self.total_stride

  def _accepted_sizes_near(self, size: int) -> list[int]:
    step = self.total_stride * (1 if self.window_padding else self.window_size)
    lower = (int(size) // step) * step
    return [v for v in (lower, lower + step) if v > 0 and v != size] or [step]

  def validate(self) -> None:
    super().validate()
    depth = self.depths[2]
    bad = [i for i in self.global_blocks if not isinstance(i, int) or not 0 <= i < depth]
    if bad:
      raise ValueError(f"global_blocks {tuple(self.global_blocks)}: index {bad[0]!r} is out of range "
                       f"for {depth} stage-3 blocks; accepted: 0..{depth - 1}")
    if len(set(self.global_blocks)) != len(self.global_blocks):
      raise ValueError(f"global_blocks {tuple(self.global_blocks)} repeats an index")
    if self.rel_pos not in _REL_POS_KINDS:
      raise ValueError(f"rel_pos {self.rel_pos!r} is not one of {_REL_POS_KINDS}")
    if self.pos_embed not in _POS_EMBED_KINDS:
      raise ValueError(f"pos_embed {self.pos_embed!r} is not one of {_POS_EMBED_KINDS}")
    if self.out_stride32 not in _STRIDE32_KINDS:
      raise ValueError(f"out_stride32 {self.out_stride32!r} is not one of {_STRIDE32_KINDS}")
    if self.pretrain_img_size <= 0 or self.pretrain_img_size % self.total_stride:
      raise ValueError(f"pretrain_img_size {self.pretrain_img_size} is not a positive multiple of "
                       f"the total stride {self.total_stride}")
    if len(self.global_blocks) < depth:
      if not isinstance(self.window_size, int) or self.window_size < 1:
        raise ValueError(f"window_size must be a positive number of tokens, got {self.window_size!r}")
      grid = self.grid_sizes[2]
      if not self.window_padding and grid % self.window_size:
        raise ValueError(
            f"img_size {self.img_size} gives a {grid}x{grid} stage-3 grid, which {self.window_size}"
            f"x{self.window_size} windows do not tile (window_padding=False); nearest accepted "
            f"img_size: {self._accepted_sizes_near(self.img_size)}, or set window_padding=True")
    if self.out_stride32 == "conv_bn_gelu" and self.grid_sizes[2] < 3:
      raise ValueError(f"img_size {self.img_size} gives a {self.grid_sizes[2]}-token grid, too small "
                       f"for the unpadded 3x3 stride-2 conv; nearest accepted img_size: "
                       f"[{3 * self.total_stride}]")
    if self.layer_scale is not None and not float(self.layer_scale) > 0:
      raise ValueError(f"layer_scale must be None or > 0, got {self.layer_scale}")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"drop_path_rate {self.drop_path_rate} must lie in [0, 1)")


# The three official backbone layouts (spec §5.1–§5.3), as config fields over a size. Block indices
# are the official ones for the 11-block stage 3; indices past a smaller depth are dropped (set
# global_blocks for other depths).
BACKBONE_PRESETS: dict[str, dict[str, Any]] = {
    # detectron2 Mask R-CNN backbone of the ConvMAE repository (DET/models/convmae.py)
    "det": dict(img_size=1024, global_blocks=(0, 3, 6, 10), window_size=16, window_padding=False,
                rel_pos="shared_table", layer_scale=None, pos_embed="frozen",
                out_stride32="maxpool", cblock_norm_eps=1e-5, drop_path_rate=0.1),
    # mmsegmentation UperNet backbone (SEG/backbone/convmae.py): global everywhere
    "seg": dict(img_size=512, global_blocks=tuple(range(11)), window_size=16, window_padding=False,
                rel_pos="per_block_table", layer_scale=1.0, pos_embed="trainable",
                out_stride32="conv_bn_gelu", cblock_norm_eps=1e-5, drop_path_rate=0.2),
    # Official-ConvMAE-Det (ViTDet codebase, projects/ConvMAEDet/modeling/convmae.py)
    "vitdet": dict(img_size=1024, global_blocks=(1, 4, 7, 10), window_size=14, window_padding=True,
                   rel_pos="decomposed", layer_scale=None, pos_embed="interpolate",
                   out_stride32="none", cblock_norm_eps=1e-6, drop_path_rate=0.1),
}
def backbone_defaults(preset: str, size: str) -> dict[str, Any]:
  """Config fields of `convvit_{preset}_{size}` (preset fields over the size table)."""
  out = dict(SIZES[size])
  out.update(BACKBONE_PRESETS[preset])
  depth = out["depths"][2]
  out["global_blocks"] = tuple(i for i in out["global_blocks"] if i < depth)
  if preset == "seg":
    out["global_blocks"] = tuple(range(depth))
  return out


# Encoder sizes. Base is the only official size; the others follow the third-party/ConvMAE-v2
# tables published with ConvMAE-v2 and third-party ports; tiny exists for tests and demos.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dims=(32, 48, 64), depths=(1, 1, 2), num_heads=4, mlp_ratios=(4.0, 4.0, 4.0)),
    "small": dict(embed_dims=(128, 256, 384), depths=(2, 2, 11), num_heads=6,
                  mlp_ratios=(4.0, 4.0, 4.0)),
    "base": dict(embed_dims=(256, 384, 768), depths=(2, 2, 11), num_heads=12,
                 mlp_ratios=(4.0, 4.0, 4.0)),
    "large": dict(embed_dims=(384, 768, 1024), depths=(2, 2, 23), num_heads=16,
                  mlp_ratios=(8.0, 8.0, 4.0)),
    "huge": dict(embed_dims=(768, 1024, 1280), depths=(2, 2, 31), num_heads=16,
                 mlp_ratios=(8.0, 8.0, 4.0)),
}
DECODER_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4),
    **{s: dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
       for s in ("small", "base", "large", "huge")},
}


def make_config(cls, defaults: dict[str, Any], overrides: dict[str, Any]):
  """Builds and validates `cls(**defaults, **overrides)`, refusing unknown fields by name."""
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(f"unknown {cls.__name__} field(s) {unknown}; accepted: {sorted(fields)}")
  kwargs = {**defaults, **overrides}
  for name in ("patch_sizes", "embed_dims", "depths", "mlp_ratios", "global_blocks"):
    if name in kwargs and name in fields:
      kwargs[name] = tuple(kwargs[name])
  cfg = cls(**kwargs)
  cfg.validate()
  return cfg
