"""Weights from anywhere into a classifier: a training workdir, a model-only checkpoint (what
``python -m convmae_jax.interop import`` writes), an official or exported ``.pth`` / ``.safetensors``.

Every source is first read as a state dict in the official PyTorch layout (``{key: numpy array}``),
so one loader (``interop.load_torch_state_dict``) does the naming, the shape checks and the encoder
transfer for all of them. torch is imported only to read a ``.pth`` file.

    sd, meta = weights.read_state_dict("runs/pretrain")            # latest step
    report = weights.init_classifier(clf, "convmae_base.pth", head_std=2e-5)
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from convmae_jax.models.pos_embed import resize_pos_embed

FILE_SUFFIXES = (".pth", ".pt", ".safetensors")
_PRETRAIN_MARKERS = ("mask_token", "decoder_embed.weight", "decoder_pred.weight")


def read_state_dict(source: str | os.PathLike, *, step: int | None = None) -> tuple[dict, dict]:
  """``(official-layout state dict, metadata)`` of ``source``.

  ``source``: a ``.pth``/``.pt``/``.safetensors`` file, or a folder holding Orbax checkpoints (a
  training workdir, its ``checkpoints/`` folder, or a model-only checkpoint); ``step`` picks a
  step of a folder (default: the latest). Raises FileNotFoundError when there is nothing to read
  and ValueError when it cannot be read (both name the source).
  """
  from convmae_jax.interop import convert
  from convmae_jax.interop import files

  path = os.fspath(source)
  if path.lower().endswith(FILE_SUFFIXES):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such file (expected a .pth, .pt or .safetensors file)")
    try:
      return files.read_torch_file(path), {"source": os.path.abspath(path)}
    except files.InteropError as e:
      raise ValueError(str(e)) from None
  try:
    model, meta = files.model_from_checkpoint(path, step)  # abstract model with the saved params
  except files.InteropError as e:
    msg = str(e)
    raise (FileNotFoundError if "No checkpoint" in msg else ValueError)(msg) from None
  return convert.to_torch_state_dict(model), dict(meta)


def state_dict_kind(sd: dict) -> str:
  """"pretraining" (decoder and mask token present), "classifier" (a head) or "encoder"."""
  if any(k in sd for k in _PRETRAIN_MARKERS):
    return "pretraining"
  if "head.weight" in sd:
    return "classifier"
  return "encoder"


def check_kind(sd: dict, expect: str, *, name: str) -> str:
  """The kind of ``sd`` (:func:`state_dict_kind`); ValueError when ``expect`` cannot use it."""
  kind = state_dict_kind(sd)
  if expect == "pretraining" and kind == "classifier":
    raise ValueError(
        f"{name} is a classifier (fine-tuned) checkpoint: it has a head "
        f"({tuple(np.shape(sd['head.weight']))}) and no decoder. Fine-tuning and linear probing start "
        "from a pretraining checkpoint (a pretraining workdir, `interop import` of a pretraining "
        ".pth, or the .pth itself); to measure this one, use the evaluate job.")
  if expect == "classifier" and kind != "classifier":
    raise ValueError(
        f"{name} is a {kind} checkpoint with no classifier head; evaluation needs a fine-tuned "
        "classifier (a fine-tuning workdir or a fine-tuned .pth). Fine-tune it first "
        "(configs/finetune.py), or linear-probe it (configs/linprobe.py).")
  return kind


def fit_pos_embed(sd: dict, model) -> tuple[dict, tuple[int, int] | None]:
  """Resizes ``sd["pos_embed"]`` (bicubic, as PyTorch's interpolate with align_corners=False) to the
  model's token grid when the image size differs. Returns the state dict and ``(old, new)`` token
  counts when it resized. ValueError when the table cannot be resized to the model (another width,
  or not a square grid), naming both shapes."""
  if "pos_embed" not in sd:
    return sd, None
  pos = np.asarray(sd["pos_embed"])
  want = tuple(model.pos_embed.shape)                 # (1, L, D); the model may be abstract
  if tuple(pos.shape) == want:
    return sd, None
  if pos.ndim != 3 or pos.shape[-1] != want[-1]:
    raise ValueError(f"pos_embed of shape {tuple(pos.shape)} cannot be resized to the model's "
                     f"{want}: the embedding widths differ (another model size?)")
  old_side = int(round(pos.shape[1] ** 0.5))
  if old_side * old_side != pos.shape[1]:
    raise ValueError(f"pos_embed with {pos.shape[1]} tokens is not a square grid; cannot resize it "
                     f"to the model's {want[1]} tokens")
  new_side = model.config.grid_sizes[2]
  out = dict(sd)
  out["pos_embed"] = resize_pos_embed(pos, new_side, old_side)
  return out, (pos.shape[1], want[1])


def init_classifier(model, source: str | os.PathLike | dict, *, step: int | None = None,
                    head_std: float | None = None, key: jax.Array | None = None,
                    expect: str = "pretraining") -> dict[str, Any]:
  """Loads ``source`` into the ConvViT ``model`` in place, the official fine-tuning way.

  * ``expect="pretraining"`` (fine-tuning, linear probing): a pretraining (or encoder-only) state
    dict; the encoder is taken, the decoder-side keys are ignored, ``fc_norm`` stays fresh and the
    head is re-initialised as N(0, ``head_std``) with a zero bias (official: 2e-5 for fine-tuning,
    0.01 for the linear probe). A classifier checkpoint is refused.
  * ``expect="classifier"`` (evaluation): every key of the model must be there, head included; a
    pretraining checkpoint is refused.
  The position embedding is resized when the image size differs. Returns a report dict.
  """
  from convmae_jax.interop import convert

  if isinstance(source, dict):
    sd, meta = source, {}
  else:
    sd, meta = read_state_dict(source, step=step)
  name = meta.get("model_name") or (os.fspath(source) if not isinstance(source, dict) else "state dict")
  kind = check_kind(sd, expect, name=name)
  sd, resized = fit_pos_embed(sd, model)
  strict = expect == "classifier"
  if expect == "pretraining":
    # The encoder only: the head (and a linear probe's norm statistics) start fresh.
    sd = {k: v for k, v in sd.items() if not k.startswith(convert.CLASSIFIER_ONLY_PREFIXES)}
  report = convert.load_torch_state_dict(model, sd, strict=strict)
  if expect == "pretraining":
    bad = [k for k in report.missing if not k.startswith(convert.CLASSIFIER_ONLY_PREFIXES)]
    if bad:
      raise ValueError(f"{name} does not hold the whole encoder: missing {bad[:10]}")
    unexpected = [k for k in report.unexpected if not k.startswith(convert.PRETRAIN_ONLY_PREFIXES)]
    if unexpected:
      raise ValueError(f"{name} has keys this model has no place for: {unexpected[:10]}")
  if head_std is not None:
    key = jax.random.key(0) if key is None else key
    kernel = model.head.kernel
    new = jax.random.normal(key, kernel[...].shape, jax.numpy.float32) * head_std
    sharding = getattr(kernel[...], "sharding", None)
    kernel[...] = jax.device_put(new, sharding) if sharding is not None else new
    model.head.bias[...] = jax.numpy.zeros_like(model.head.bias[...])
  return {"source": os.fspath(source) if not isinstance(source, dict) else "state dict",
          "kind": kind, "loaded": len(report.loaded), "missing": report.missing,
          "ignored": len(report.ignored), "pos_embed_resized": resized,
          "model_name": meta.get("model_name"), "step": meta.get("step")}


def _backbone_only(key: str) -> bool:
  """Keys a pretraining checkpoint cannot hold: relative-position terms, layer scale, the
  segmentation backbone's stride-32 branch."""
  return (key.startswith(("windowed_rel_pos_bias.", "global_rel_pos_bias.", "fpn."))
          or ".relative_position_" in key or ".rel_pos_" in key or ".gamma_" in key)


def init_backbone(model, source: str | os.PathLike | dict, *,
                  step: int | None = None) -> dict[str, Any]:
  """Loads a checkpoint into a detection / segmentation backbone in place, as the official
  codebases do it when they start from pretrained weights.

  ``source``: a pretraining checkpoint (ours: a workdir or model-only checkpoint; or an official
  ``.pth``), a classifier or encoder state dict, or a trained backbone (bare, codebase-prefixed or a
  whole detector/segmentor checkpoint). The encoder keys are taken; decoder-side and classifier-only
  keys are ignored; a ``pos_embed`` of another grid is resized bicubic (align_corners=False) to the
  model's stored grid (the token grid, or the pretraining grid for ``pos_embed="interpolate"``);
  relative-position tables, layer-scale gammas and the ``fpn`` branch keep their initial values
  (tables zero) when the source has none. ValueError, before anything changes, for a missing
  encoder key or shapes that do not fit (naming the first keys). Returns a report dict.
  """
  from convmae_jax.interop import backbone as ib
  from convmae_jax.interop import convert

  if isinstance(source, dict):
    sd, meta = source, {}
  else:
    sd, meta = read_state_dict(source, step=step)
  name = meta.get("model_name") or (os.fspath(source) if not isinstance(source, dict) else "state dict")
  sd, prefix, outside = ib.strip_prefix(convert.unwrap_state_dict(sd))
  kind = state_dict_kind(sd) if not any(_backbone_only(k) for k in sd) else "backbone"
  drop = convert.PRETRAIN_ONLY_PREFIXES + convert.CLASSIFIER_ONLY_PREFIXES
  ignored = [k for k in sd if k.startswith(drop)]
  sd = {k: v for k, v in sd.items() if not k.startswith(drop)}

  resized = None
  if "pos_embed" in sd:
    pos = np.asarray(convert._to_numpy(sd["pos_embed"]))
    want = tuple(model.pos_embed.shape)
    if tuple(pos.shape) != want:
      side = int(round(pos.shape[1] ** 0.5)) if pos.ndim == 3 else 0
      # Another width (another model size) is left to the shape check, which names every key.
      if pos.ndim == 3 and pos.shape[-1] == want[-1]:
        if side * side != pos.shape[1]:
          raise ValueError(f"{name}: pos_embed {tuple(pos.shape)} is not a square grid; cannot "
                           f"resize it to the backbone's {want}")
        new_side = int(round(want[1] ** 0.5))
        sd = dict(sd, pos_embed=resize_pos_embed(pos, new_side, side))
        resized = (pos.shape[1], want[1])

  expected = ib.backbone_state_dict_shapes(model)
  missing = [k for k in expected if k not in sd and not _backbone_only(k)]
  if missing:
    raise ValueError(f"{name} does not hold the whole encoder for this backbone: "
                     f"{len(missing)} missing key(s), first {missing[:10]}")
  unexpected = [k for k in sd if k not in expected]
  if unexpected:
    raise ValueError(f"{name} has {len(unexpected)} key(s) this backbone has no place for, first "
                     f"{unexpected[:10]}")
  # Shapes (and relative-position index buffers) are checked there, before anything changes.
  report = ib.load_backbone_state_dict(model, sd, strict=False)
  return {"source": name, "kind": kind, "prefix": prefix, "loaded": len(report.loaded),
          "kept_initial": report.missing, "ignored": len(ignored) + len(outside),
          "pos_embed_resized": resized}
