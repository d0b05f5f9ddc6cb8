"""PyTorch interop: export our weights in the official ConvMAE/ConvViT layout, import official ones.

    from convmae_jax import interop
    sd = interop.to_torch_state_dict(model)          # {official key: numpy array}
    report = interop.load_torch_state_dict(model, sd)  # in place; raises ValueError on bad keys
    tm = interop.torch_model("convmae_base", img_size=224, norm_pix_loss=True)  # torch.nn.Module
    sd = interop.to_backbone_state_dict(net, prefix="codebase")   # detection/segmentation backbones
    from convmae_jax.interop.torch_backbone import torch_backbone  # their PyTorch twins

Importing this package is free: nothing (not jax, not torch) is imported until a name is used, and
torch only by ``torch_model`` / the ``torch_reference`` module. Command line:
``python -m convmae_jax.interop export|import ...`` (see ``__main__.py``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["to_torch_state_dict", "load_torch_state_dict", "torch_model", "LoadReport",
           "unwrap_state_dict", "to_backbone_state_dict", "load_backbone_state_dict",
           "save_backbone"]

_LAZY = {
    "to_torch_state_dict": "convmae_jax.interop.convert",
    "load_torch_state_dict": "convmae_jax.interop.convert",
    "LoadReport": "convmae_jax.interop.convert",
    "unwrap_state_dict": "convmae_jax.interop.convert",
    "torch_model": "convmae_jax.interop.torch_reference",
    "to_backbone_state_dict": "convmae_jax.interop.backbone",
    "load_backbone_state_dict": "convmae_jax.interop.backbone",
    "save_backbone": "convmae_jax.interop.backbone",
}

if TYPE_CHECKING:  # pragma: no cover
    from convmae_jax.interop.convert import (LoadReport, load_torch_state_dict, to_torch_state_dict,
                                             unwrap_state_dict)
    from convmae_jax.interop.torch_reference import torch_model


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
