"""Backbone weights in the official detection / segmentation layouts, both ways (no torch here).

    sd = backbone.to_backbone_state_dict(net)                       # bare keys, as the backbone's own
    sd = backbone.to_backbone_state_dict(net, prefix="codebase")    # as inside the full detector
    report = backbone.load_backbone_state_dict(net, sd)             # any of the above, or a whole
                                                                    # detector / segmentor checkpoint

Keys are the official backbones' (spec §5, `backbone_facts.json`), buffers included:
`relative_position_index` (int64, recomputed, checked on import) and the BatchNorm running
statistics of the segmentation backbone's `fpn.1`. Inside the full models the backbone sits under a
prefix, which `CODEBASE_PREFIXES` lists per layout:

| layout (rel_pos)                 | codebase                              | prefix                 |
|----------------------------------|---------------------------------------|------------------------|
| det (shared_table)               | detectron2 FPN (`bottom_up`)          | `backbone.bottom_up.`  |
| seg (per_block_table)            | mmsegmentation EncoderDecoder         | `backbone.`            |
| vitdet (decomposed)              | detectron2 ViTDet SimpleFeaturePyramid| `backbone.net.`        |

Layouts of the tensors are those of `convert.py` (conv HWIO ↔ OIHW, Linear (I, O) ↔ (O, I), CBlock
1×1 convs Dense ↔ (O, I, 1, 1)); relative-position tables, gammas and BatchNorm vectors are copied.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from convmae_jax.interop import convert

__all__ = ["CODEBASE_PREFIXES", "codebase_prefix", "to_backbone_state_dict",
           "backbone_state_dict_shapes", "load_backbone_state_dict", "BackboneLoadReport",
           "strip_prefix", "save_backbone"]

CODEBASE_PREFIXES = {"shared_table": "backbone.bottom_up.", "per_block_table": "backbone.",
                     "decomposed": "backbone.net.", "none": "backbone."}
_ALL_PREFIXES = ("backbone.bottom_up.", "backbone.net.", "backbone.")   # longest first
_INDEX = "relative_position_index"


def codebase_prefix(config) -> str:
  """The prefix the official codebase of this layout puts before the backbone's keys."""
  return CODEBASE_PREFIXES[config.rel_pos]


def _variable_filter():
  from flax import nnx
  from convmae_jax.models.layers import FrozenPosEmbed
  return nnx.Any(nnx.Param, FrozenPosEmbed, nnx.BatchStat)


def _variables(model) -> dict[tuple, Any]:
  from flax import nnx
  return convert._flatten(nnx.to_pure_dict(nnx.state(model, _variable_filter())))


def _index_buffers(model) -> dict[str, tuple[int, int]]:
  """{key of a relative_position_index buffer: the grid it indexes}, read off the modules."""
  out = {}
  for name in ("windowed_rel_pos_bias", "global_rel_pos_bias"):
    if hasattr(model, name):
      out[f"{name}.{_INDEX}"] = getattr(model, name).grid
  for i, blk in enumerate(model.blocks3):
    if blk.attn.rel_pos == "table":
      out[f"blocks3.{i}.attn.{_INDEX}"] = blk.attn.rel_pos_grid
  return out


def _key_map(model) -> dict[str, tuple]:
  """{official key: (nnx path or None for an index buffer, torch shape)} in official order."""
  out = {}
  for path, v in _variables(model).items():
    out[convert.torch_key(path)] = (path, convert._torch_shape(path, tuple(v.shape)))
  for key, (gh, gw) in _index_buffers(model).items():
    out[key] = (None, (gh * gw, gh * gw))
  return {k: out[k] for k in sorted(out, key=convert._sort_key)}


def _resolve_prefix(model, prefix: str | None) -> str:
  if prefix == "codebase":
    return codebase_prefix(model.config)
  return prefix or ""


def backbone_state_dict_shapes(model, prefix: str | None = "") -> dict[str, tuple]:
  """{official key: shape} without computing anything (works on an `nnx.eval_shape` model)."""
  p = _resolve_prefix(model, prefix)
  return {p + k: shape for k, (_, shape) in _key_map(model).items()}


def to_backbone_state_dict(model, prefix: str | None = "") -> dict[str, np.ndarray]:
  """Every parameter and buffer of the backbone under its official key: float32 arrays, int64
  `relative_position_index` and `num_batches_tracked`. prefix: "" (the backbone module's own
  state dict), "codebase" (as inside the official detector / segmentor) or any string."""
  from convmae_jax.models.backbone import relative_position_index

  p = _resolve_prefix(model, prefix)
  flat = _variables(model)
  grids = _index_buffers(model)
  out = {}
  for key, (path, _) in _key_map(model).items():
    if path is None:
      out[p + key] = relative_position_index(grids[key])
      continue
    a = np.asarray(flat[path])
    if key.endswith("num_batches_tracked"):
      out[p + key] = a.astype(np.int64)
    else:
      out[p + key] = np.ascontiguousarray(convert._to_torch_layout(path, a).astype(np.float32))
  return out


def strip_prefix(sd: Mapping[str, Any]) -> tuple[dict[str, Any], str, list[str]]:
  """(backbone keys without their codebase prefix, the prefix, keys outside the backbone).

  A state dict whose keys start with one of the known prefixes (a whole detector or segmentor
  checkpoint) keeps only the backbone's keys; others are returned unchanged."""
  for p in _ALL_PREFIXES:
    inside = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    if inside and any(k.startswith(("patch_embed", "blocks")) for k in inside):
      return inside, p, [k for k in sd if not k.startswith(p)]
  return dict(sd), "", []


@dataclasses.dataclass
class BackboneLoadReport:
  """loaded: keys copied in; missing: model keys absent (left as they were); ignored: keys of the
  checkpoint outside the backbone (other modules of a detector, or pretraining-only keys);
  prefix: the codebase prefix that was removed."""
  loaded: list[str]
  missing: list[str]
  ignored: list[str]
  prefix: str

  def __str__(self) -> str:
    return (f"loaded {len(self.loaded)} keys; missing {len(self.missing)} "
            f"{self.missing[:convert._SHOW]}; ignored {len(self.ignored)}; prefix {self.prefix!r}")


def load_backbone_state_dict(model, state_dict: Mapping[str, Any], *, strict: bool = True,
                             allow_missing: tuple[str, ...] = (),
                             ignore: tuple[str, ...] = ()) -> BackboneLoadReport:
  """Copies an official-layout backbone state dict into `model` in place.

  Accepts the bare backbone keys, a codebase-prefixed or whole-detector state dict (the prefix is
  found and removed, other modules' keys are ignored), and `{"model": ...}` / `{"state_dict": ...}`
  wrappers. Everything is checked before anything changes: ValueError names the first missing,
  unexpected and wrongly-shaped keys, and a `relative_position_index` that differs from this
  layout's. allow_missing: key prefixes that may be absent even with strict (they keep their
  values); ignore: key prefixes dropped from the input (reported as ignored).
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from convmae_jax.models.backbone import relative_position_index

  sd, prefix, outside = strip_prefix(convert.unwrap_state_dict(state_dict))
  ignored = list(outside) + [k for k in sd if ignore and k.startswith(ignore)]
  sd = {k: v for k, v in sd.items() if not (ignore and k.startswith(ignore))}
  kmap = _key_map(model)
  grids = _index_buffers(model)
  missing = [k for k in kmap if k not in sd]
  unexpected = [k for k in sd if k not in kmap]
  wrong = []
  for k, (path, tshape) in kmap.items():
    if k in sd and tuple(np.shape(sd[k])) != tshape:
      wrong.append(f"{k}: checkpoint {tuple(np.shape(sd[k]))}, model {tshape}")
  errors = []
  if wrong:
    errors.append(f"{len(wrong)} key(s) with shapes that do not fit: {convert._names(wrong)}")
  if strict:
    bad_missing = [k for k in missing if not (allow_missing and k.startswith(allow_missing))]
    if bad_missing:
      errors.append(f"{len(bad_missing)} missing key(s): {convert._names(bad_missing)}")
    if unexpected:
      errors.append(f"{len(unexpected)} unexpected key(s): {convert._names(unexpected)}")
  if not wrong:
    for k, grid in grids.items():
      if k in sd and not np.array_equal(convert._to_numpy(sd[k]), relative_position_index(grid)):
        errors.append(f"{k} is not the relative position index of a {grid[0]}x{grid[1]} grid")
  if errors:
    raise ValueError(f"state dict does not fit the backbone ({type(model).__name__}, "
                     f"img_size {model.config.img_size}): " + "; ".join(errors))

  state = nnx.state(model, _variable_filter())
  flat_old = convert._flatten(nnx.to_pure_dict(state))
  new_flat, loaded = {}, []
  for k, (path, _) in kmap.items():
    if path is None:
      if k in sd:
        loaded.append(k)
      continue
    old = flat_old[path]
    if k not in sd:
      new_flat[path] = old
      continue
    a = convert._to_numpy(sd[k])
    a = convert._from_torch_layout(path, a, len(old.shape))
    new = jnp.asarray(np.array(a, order="C"), dtype=old.dtype)  # keeps 0-d arrays 0-d
    sharding = getattr(old, "sharding", None)
    new_flat[path] = jax.device_put(new, sharding) if sharding is not None else new
    loaded.append(k)
  nnx.replace_by_pure_dict(state, convert._unflatten(new_flat))
  nnx.update(model, state)
  return BackboneLoadReport(loaded=loaded, missing=missing, ignored=ignored, prefix=prefix)


def save_backbone(model, path: str, *, prefix: str | None = "", wrapper: str | None = "model") -> dict:
  """Writes `to_backbone_state_dict(model, prefix)` to `path`: `.pth` as `{wrapper: state_dict}`
  (torch.save; wrapper None = the bare state dict; detectron2 reads "model", mmcv "state_dict" or
  a bare dict), `.safetensors` as the bare state dict (no torch needed). Returns the state dict."""
  sd = to_backbone_state_dict(model, prefix)
  if str(path).endswith(".safetensors"):
    from safetensors.numpy import save_file
    save_file({k: np.array(v, order="C") for k, v in sd.items()}, str(path))
  elif str(path).endswith((".pth", ".pt")):
    import torch
    tensors = {k: torch.from_numpy(np.array(v, order="C")) for k, v in sd.items()}
    torch.save({wrapper: tensors} if wrapper else tensors, str(path))
  else:
    raise ValueError(f"{path}: unknown file type; use .pth, .pt or .safetensors")
  return sd
