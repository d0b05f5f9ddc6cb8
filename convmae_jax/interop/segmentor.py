"""UperNet segmentor weights in mmsegmentation's ``EncoderDecoder`` layout, both ways (no torch here).

    sd = segmentor.to_segmentor_state_dict(seg)        # {"backbone.…", "decode_head.…",
                                                       #  "auxiliary_head.…": float32 / int64 arrays}
    segmentor.load_segmentor_state_dict(seg, sd)       # the same keys (an mmseg checkpoint's
                                                       # "state_dict"), shapes checked first

The backbone's keys are those of ``interop.backbone`` under ``backbone.``. The heads' keys follow
mmseg 0.11: ConvModules hold ``conv.weight`` (OIHW, no bias) and ``bn.{weight, bias, running_mean,
running_var, num_batches_tracked}``; PPM branches are ``decode_head.psp_modules.{i}.1.*`` (index 0
of mmseg's Sequential is the parameter-free pool); classifiers ``{head}.conv_seg.{weight, bias}``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from convmae_jax.interop import backbone as ib
from convmae_jax.interop import convert

HEADS = ("decode_head", "auxiliary_head")


def _head_variables(model) -> dict[tuple, Any]:
  from flax import nnx
  out = {}
  for head in HEADS:
    if hasattr(model, head):
      state = nnx.to_pure_dict(nnx.state(getattr(model, head), nnx.Any(nnx.Param, nnx.BatchStat)))
      out.update({(head,) + k: v for k, v in convert._flatten(state).items()})
  return out


def head_key(path: tuple) -> str:
  """NNX path of a head variable -> mmseg key, e.g. ('decode_head', 'psp_modules', 0, 'conv',
  'kernel') -> 'decode_head.psp_modules.0.1.conv.weight'."""
  names = [str(p) for p in path]
  if names[1] == "psp_modules":
    names.insert(3, "1")
  if names[-1] in ("kernel", "scale"):
    names[-1] = "weight"
  return ".".join(names)


def _to_torch(path: tuple, a: np.ndarray) -> np.ndarray:
  if str(path[-1]) == "kernel":
    return np.ascontiguousarray(a.transpose(3, 2, 0, 1))      # HWIO -> OIHW
  if str(path[-1]) == "num_batches_tracked":
    return a.astype(np.int64)
  return a.astype(np.float32)


def to_segmentor_state_dict(model) -> dict[str, np.ndarray]:
  """Every parameter and buffer of the segmentor under its mmseg key (module docstring)."""
  out = ib.to_backbone_state_dict(model.backbone, prefix="backbone.")
  for path, v in _head_variables(model).items():
    out[head_key(path)] = _to_torch(path, np.asarray(v))
  return out


def segmentor_state_dict_shapes(model) -> dict[str, tuple]:
  """{mmseg key: shape} without computing anything (an ``nnx.eval_shape`` model works)."""
  out = ib.backbone_state_dict_shapes(model.backbone, prefix="backbone.")
  for path, v in _head_variables(model).items():
    shape = tuple(v.shape)
    out[head_key(path)] = (shape[3], shape[2], shape[0], shape[1]) if str(path[-1]) == "kernel" \
        else shape
  return out


def load_segmentor_state_dict(model, state_dict: Mapping[str, Any]) -> None:
  """Copies an mmseg-layout state dict (every key of :func:`to_segmentor_state_dict`) into
  ``model`` in place. ValueError naming the keys, before anything changes, for missing or
  unexpected keys or shapes that do not fit."""
  from flax import nnx
  sd = {k: np.asarray(convert._to_numpy(v)) for k, v in convert.unwrap_state_dict(dict(state_dict)).items()}
  want = segmentor_state_dict_shapes(model)
  missing = [k for k in want if k not in sd]
  unexpected = [k for k in sd if k not in want]
  bad = [k for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k])]
  if missing or unexpected or bad:
    raise ValueError(f"segmentor state dict does not fit: missing {missing[:10]}, unexpected "
                     f"{unexpected[:10]}, shapes differ {[(k, sd[k].shape, want[k]) for k in bad[:5]]}")
  ib.load_backbone_state_dict(model.backbone, {k[len("backbone."):]: v for k, v in sd.items()
                                               if k.startswith("backbone.")})
  for head in HEADS:
    if not hasattr(model, head):
      continue
    module = getattr(model, head)
    state = nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))
    pure = nnx.to_pure_dict(state)
    flat = convert._flatten(pure)
    new = {}
    for path, old in flat.items():
      a = sd[head_key((head,) + path)]
      if str(path[-1]) == "kernel":
        a = a.transpose(2, 3, 1, 0)                            # OIHW -> HWIO
      new[path] = np.asarray(a).astype(np.asarray(old).dtype)
    nnx.replace_by_pure_dict(state, convert._unflatten(new))
    nnx.update(module, state)
