"""Weights files and what they hold: reading and writing official ``.pth`` / ``.safetensors`` state
dicts, the model fields our exports store, the model an official state dict fits, and a model
rebuilt from an Orbax checkpoint. Used by the command line (``__main__.py``), ``convmae_jax.load``
and ``weights``; torch is imported only to read or write a ``.pth``."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

PTH_SUFFIXES = (".pth", ".pt", ".bin")
ST_SUFFIXES = (".safetensors",)


class InteropError(Exception):
  """Bad input (a file, a checkpoint, model settings): the message says what and how to fix it;
  the command line prints it without a traceback (exit status 2)."""


# ------------------------------------------------------------------------------------------------
# files

def suffix_kind(path: Path) -> str:
  suf = path.suffix.lower()
  if suf in PTH_SUFFIXES:
    return "pth"
  if suf in ST_SUFFIXES:
    return "safetensors"
  raise InteropError(f"{path}: unknown file type {suf!r}; use .pth (or .pt) or .safetensors")


def read_torch_file(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, Any]:
  """Reads a ``.pth``/``.pt`` or ``.safetensors`` file and returns the flat state dict of numpy arrays
  (``"model"`` / ``"state_dict"`` wrappers and a ``module.`` prefix are removed)."""
  from convmae_jax.interop.convert import _to_numpy, unwrap_state_dict

  path = Path(path)
  kind = suffix_kind(path)
  if not path.is_file():
    raise InteropError(f"{path}: no such file")
  if kind == "safetensors":
    from safetensors.numpy import load_file
    try:
      sd = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - report any parse error as bad input
      raise InteropError(f"{path}: not a readable safetensors file ({e})") from e
  else:
    import argparse as _argparse

    import torch
    try:
      if allow_pickle:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
      else:
        # Official training checkpoints also carry an argparse.Namespace ("args").
        with torch.serialization.safe_globals([_argparse.Namespace]):
          obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
      hint = "" if allow_pickle else (
        " If you trust the file and it holds other Python objects, pass --allow_pickle.")
      raise InteropError(f"{path}: could not be read by torch.load ({e}).{hint}") from e
    try:
      sd = unwrap_state_dict(obj)
    except TypeError as e:
      raise InteropError(f"{path}: {e}") from e
  try:
    sd = unwrap_state_dict(sd)
  except TypeError as e:
    raise InteropError(f"{path}: {e}") from e
  out = {}
  for k, v in sd.items():
    if not (hasattr(v, "shape") and hasattr(v, "dtype")):
      raise InteropError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    out[k] = _to_numpy(v)
  return out


def _atomic_write(out: Path, write) -> None:
  """write(tmp_path) then rename onto ``out`` (never leaves a half-written output behind)."""
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=str(out.parent))
  os.close(fd)
  try:
    write(tmp)
    # mkstemp creates 0600; give the file the permissions any new file gets (umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, out)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_torch_file(sd: dict, out: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> None:
  """``.pth``: ``torch.save({"model": sd})``; ``.safetensors``: the bare state dict."""
  out = Path(out)
  kind = suffix_kind(out)
  if kind == "safetensors":
    from safetensors.numpy import save_file
    meta = {"format": "pt", **(metadata or {})}
    _atomic_write(out, lambda tmp: save_file(sd, tmp, metadata=meta))
  else:
    import torch
    tsd = {k: torch.from_numpy(v) for k, v in sd.items()}
    _atomic_write(out, lambda tmp: torch.save({"model": tsd}, tmp))


def safetensors_model_fields(path: str | os.PathLike) -> tuple[str | None, dict[str, Any]]:
  """(model name, model kwargs) stored in a ``.safetensors`` file written by our export, else
  (None, {})."""
  from safetensors import safe_open

  with safe_open(os.fspath(path), framework="np") as f:
    meta = f.metadata() or {}
  name = meta.get("model_name") or None
  try:
    kwargs = json.loads(meta.get("model_kwargs") or "{}")
  except json.JSONDecodeError:
    kwargs = {}
  return (name if name and name != "None" else None), dict(kwargs)


# ------------------------------------------------------------------------------------------------
# model inference from a state dict

def _count(sd: dict, prefix: str) -> int:
  pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
  ids = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
  return max(ids) + 1 if ids else 0


def infer_model(sd: dict[str, Any]) -> tuple[str, dict[str, Any]]:
  """(registry name, config overrides) that fit an official-layout state dict.

  Sizes, depths, mlp ratios, patch sizes, in_chans, img_size, decoder sizes, num_classes and
  global_pool are read off the tensor shapes; attention heads are not visible in the weights and
  come from the size-table entry with the same widths and depths (else: error, pass --model).
  """
  from convmae_jax.models import config as mcfg

  def shape(key):
    if key not in sd:
      raise InteropError(f"cannot infer the model: key {key!r} is missing; pass --model")
    return tuple(sd[key].shape)

  family = "convmae" if any(k.startswith("decoder_embed.") for k in sd) else "convvit"
  pe = [shape(f"patch_embed{i}.proj.weight") for i in (1, 2, 3)]
  embed_dims = tuple(int(s[0]) for s in pe)
  patch_sizes = tuple(int(s[2]) for s in pe)
  in_chans = int(pe[0][1])
  depths = tuple(_count(sd, f"blocks{i}") for i in (1, 2, 3))
  if min(depths) < 1:
    raise InteropError(f"cannot infer the model: block depths {depths}; pass --model")
  mlp_ratios = tuple(shape(f"blocks{i}.0.mlp.fc1.weight")[0] / embed_dims[i - 1] for i in (1, 2, 3))
  length = shape("pos_embed")[1]
  grid = int(round(math.sqrt(length)))
  kw: dict[str, Any] = dict(img_size=grid * math.prod(patch_sizes), in_chans=in_chans,
                              patch_sizes=patch_sizes, embed_dims=embed_dims, depths=depths,
                              mlp_ratios=mlp_ratios)
  size = next((s for s, v in mcfg.SIZES.items()
                 if tuple(v["embed_dims"]) == embed_dims and tuple(v["depths"]) == depths), None)
  if size is None:
    size = next((s for s, v in mcfg.SIZES.items() if tuple(v["embed_dims"]) == embed_dims), None)
  if size is None:
    raise InteropError(f"cannot infer the number of attention heads for embed_dims {embed_dims}, depths "
                       f"{depths} (no size-table entry has them); pass --model and --kwargs "
                       "'{\"num_heads\": H, ...}'")
  if family == "convmae":
    dd = shape("decoder_embed.weight")[0]
    kw.update(decoder_embed_dim=int(dd), decoder_depth=_count(sd, "decoder_blocks"))
    if kw["decoder_depth"]:
      ratio = shape("decoder_blocks.0.mlp.fc1.weight")[0] / dd
      if ratio != mlp_ratios[0]:
        kw["decoder_mlp_ratio"] = ratio
    table_dec = mcfg.DECODER_SIZES[size]
    if table_dec["decoder_embed_dim"] != dd:
      raise InteropError(f"cannot infer decoder heads for decoder width {dd}; pass --model and "
                           "--kwargs '{\"decoder_num_heads\": H}'")
  else:
    if "head.weight" in sd:
      kw["num_classes"] = int(shape("head.weight")[0])
    kw["global_pool"] = "norm.weight" not in sd or "fc_norm.weight" in sd
  return f"{family}_{size}", kw


# ------------------------------------------------------------------------------------------------
# a model from an Orbax checkpoint

def model_from_checkpoint(workdir: str, step: int | None):
  """(model with the checkpoint's parameters, metadata). The model is built abstractly (no init)."""
  from flax import nnx

  from convmae_jax import checkpoints, models
  from convmae_jax.interop.convert import _flatten, _param_filter, _unflatten

  try:
    pure, meta = checkpoints.load_model_state(workdir, step=step)
  except FileNotFoundError as e:
    raise InteropError(str(e)) from e
  name, kwargs = meta.get("model_name"), meta.get("model_kwargs") or {}
  if not name:
    raise InteropError(f"{workdir}: checkpoint metadata has no model_name ({meta})")
  abstract = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0), **kwargs))
  params = nnx.state(abstract, _param_filter())
  want = _flatten(nnx.to_pure_dict(params))
  have = _flatten(pure)
  missing = [p for p in want if p not in have]
  bad = [f"{'/'.join(map(str, p))}: {tuple(have[p].shape)} vs {tuple(v.shape)}"
           for p, v in want.items() if p in have and tuple(have[p].shape) != tuple(v.shape)]
  if missing or bad:
    raise InteropError(f"{workdir}: checkpoint does not fit {name} {kwargs}: missing "
                       f"{['/'.join(map(str, p)) for p in missing[:10]]}, wrong shapes {bad[:10]}")
  nnx.replace_by_pure_dict(params, _unflatten({p: have[p] for p in want}))
  nnx.update(abstract, params)
  return abstract, meta
