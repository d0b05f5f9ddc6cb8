"""A self-contained PyTorch twin of the official UperNet segmentor (mmseg 0.11 ``EncoderDecoder``
with ``UPerHead`` and ``FCNHead``, spec §5.2), written from mmseg's documented behaviour in plain
``torch.nn`` (no mmcv): ``nn.AdaptiveAvgPool2d``, ``F.interpolate(mode="bilinear",
align_corners=False)``, ``nn.BatchNorm2d``, ``nn.Dropout2d`` and ``F.cross_entropy`` with
``ignore_index``. Module names give mmseg's state-dict keys, so ``interop.segmentor``'s export loads
with ``strict=True``.

    twin = torch_segmentor("convvit_seg_tiny", num_classes=10, img_size=64, head={"channels": 32})
    logits = twin(images_nchw)                 # (N, K, H, W), the decode head resized to the input
    loss, parts = twin.loss(images_nchw, labels)

This module imports torch (tests and benchmarks only).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from convmae_jax.interop.torch_backbone import torch_backbone

FEATURE_KEYS = ("stride4", "stride8", "stride16", "stride32")


def _resize(x: torch.Tensor, size) -> torch.Tensor:
  return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvModule(nn.Module):
  """conv (no bias) -> bn -> ReLU, mmcv's names."""

  def __init__(self, cin: int, cout: int, k: int):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    self.bn = nn.BatchNorm2d(cout)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class UPerHeadTorch(nn.Module):
  def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
               pool_scales=(1, 2, 3, 6), dropout: float = 0.1):
    super().__init__()
    self.psp_modules = nn.ModuleList(
        [nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels[-1], channels, 1))
         for s in pool_scales])
    self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3)
    self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1) for c in in_channels[:-1]])
    self.fpn_convs = nn.ModuleList([ConvModule(channels, channels, 3) for _ in in_channels[:-1]])
    self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)
    self.dropout = nn.Dropout2d(dropout)
    self.conv_seg = nn.Conv2d(channels, num_classes, 1)

  def forward(self, inputs):
    x = inputs[-1]
    psp = [x] + [_resize(m(x), x.shape[2:]) for m in self.psp_modules]
    top = self.bottleneck(torch.cat(psp, dim=1))
    lats = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)] + [top]
    for i in range(len(lats) - 1, 0, -1):
      lats[i - 1] = lats[i - 1] + _resize(lats[i], lats[i - 1].shape[2:])
    outs = [self.fpn_convs[i](lats[i]) for i in range(len(lats) - 1)] + [lats[-1]]
    outs = [outs[0]] + [_resize(o, outs[0].shape[2:]) for o in outs[1:]]
    return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class FCNHeadTorch(nn.Module):
  def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1,
               dropout: float = 0.1):
    super().__init__()
    self.convs = nn.Sequential(*[ConvModule(in_channels if i == 0 else channels, channels, 3)
                                 for i in range(num_convs)])
    self.dropout = nn.Dropout2d(dropout)
    self.conv_seg = nn.Conv2d(channels if num_convs else in_channels, num_classes, 1)

  def forward(self, x):
    return self.conv_seg(self.dropout(self.convs(x)))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
                  avg_non_ignore: bool = False) -> torch.Tensor:
  """mmseg's CrossEntropyLoss: per-pixel CE (0 at ignored pixels) averaged over all pixels, or over
  the labelled ones with ``avg_non_ignore``."""
  per_pixel = F.cross_entropy(logits, labels.long(), reduction="none", ignore_index=ignore_index)
  if avg_non_ignore:
    return per_pixel.sum() / (labels != ignore_index).sum().clamp(min=1)
  return per_pixel.mean()


class SegmentorTorch(nn.Module):
  def __init__(self, backbone: nn.Module, in_channels: Sequence[int], head: dict):
    super().__init__()
    self.backbone = backbone
    self.head = dict(head)
    self.decode_head = UPerHeadTorch(in_channels, head["channels"], head["num_classes"],
                                     head["pool_scales"], head["dropout"])
    if head["aux_channels"] > 0:
      idx = head["aux_in_index"]
      self.auxiliary_head = FCNHeadTorch(in_channels[idx], head["aux_channels"],
                                         head["num_classes"], head["aux_num_convs"],
                                         head["dropout"])

  def head_logits(self, imgs):
    maps = self.backbone(imgs)
    feats = [maps[k] for k in FEATURE_KEYS]
    aux = (self.auxiliary_head(feats[self.head["aux_in_index"]])
           if hasattr(self, "auxiliary_head") else None)
    return self.decode_head(feats), aux

  def forward(self, imgs):
    maps = self.backbone(imgs)
    return _resize(self.decode_head([maps[k] for k in FEATURE_KEYS]), imgs.shape[2:])

  def loss(self, imgs, labels):
    decode, aux = self.head_logits(imgs)
    size = labels.shape[1:]
    ani = self.head["avg_non_ignore"]
    parts = {"decode_loss": cross_entropy(_resize(decode, size), labels, avg_non_ignore=ani)}
    total = parts["decode_loss"]
    if aux is not None:
      parts["aux_loss"] = cross_entropy(_resize(aux, size), labels, avg_non_ignore=ani)
      total = total + self.head["aux_weight"] * parts["aux_loss"]
    return total, parts


def torch_segmentor(backbone: str, *, head: dict | None = None, **backbone_overrides) -> SegmentorTorch:
  """PyTorch twin of ``models.create_segmentor(backbone, head=head, **backbone_overrides)``."""
  from convmae_jax.models import upernet

  hcfg = upernet.head_config_from(head or {})
  bb = torch_backbone(backbone, **backbone_overrides)
  from convmae_jax import models
  c1, c2, d = models.config_for(backbone, **backbone_overrides).embed_dims
  return SegmentorTorch(bb, (c1, c2, d, d), hcfg.to_dict())
