"""A trained model from anywhere, and its reconstructions, in two calls.

    import convmae_jax
    model = convmae_jax.load("runs/convmae_base")                 # a training workdir: latest step
    model = convmae_jax.load("runs/convmae_base", step=40000)     # or a given step
    model = convmae_jax.load("weights/convmae_base")              # `interop import` output
    model = convmae_jax.load("convmae_base.pth")                  # official or exported PyTorch file
    model = convmae_jax.load("convmae_base.safetensors")
    grid = convmae_jax.reconstruct(model, ["cat.jpg", "dog.png"], out="grid.png")

The model (ConvMAE or ConvViT, size and image size) is read from the checkpoint's metadata, from
the fields an export stores in a ``.safetensors`` file, or inferred from the tensor shapes as
``python -m convmae_jax.interop import`` does; ``**overrides`` set other config fields (``dtype``,
``mask_ratio``, ...). The model comes back in eval mode (no drop path). torch is imported only to
read a ``.pth`` file.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")
# Config fields a file's own metadata may not override: they decide the weights' shapes.
_RUNTIME_FIELDS = ("dtype", "mask_ratio", "norm_pix_loss", "drop_path_rate", "conv_impl",
                   "dwconv_impl", "attention_impl")


def load(path: str | os.PathLike, *, step: int | None = None, model: str | None = None,
         seed: int = 0, **overrides: Any):
  """The NNX model stored at ``path`` (see the module docstring), in eval mode.

  Args:
    path: a training workdir (or its ``checkpoints/`` folder), a model-only checkpoint folder, a
      ``.pth``/``.pt`` or a ``.safetensors`` file.
    step: the checkpoint step of a folder (default: the latest).
    model: the registry name (``models.names()``) when it cannot be read or inferred.
    seed: seeds the RNG streams the model keeps (drop path, masking noise when none is passed).
    **overrides: other config fields, e.g. ``dtype="bfloat16"``, ``mask_ratio=0.5``.

  Raises:
    FileNotFoundError: nothing at ``path``. ValueError: the weights do not fit the model.
  """
  from flax import nnx

  from convmae_jax import checkpoints, models
  from convmae_jax.interop import convert, files

  path = os.fspath(path)
  if path.lower().endswith(_FILE_SUFFIXES):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such file")
    try:
      sd = files.read_torch_file(path)
    except files.InteropError as e:
      raise ValueError(str(e)) from None
    name, kwargs = None, {}
    if path.lower().endswith(".safetensors"):
      name, kwargs = files.safetensors_model_fields(path)
    if model:
      name = model
    if name is None:
      try:
        name, kwargs = files.infer_model(sd)
      except files.InteropError as e:
        raise ValueError(f"{path}: {e}") from None
    kwargs = {**kwargs, **overrides}
    net = models.create(name, rngs=nnx.Rngs(seed), **kwargs)
    convert.load_torch_state_dict(net, sd, strict=True)
  else:
    _, meta = checkpoints.load_model_state(path, step=step)   # FileNotFoundError names the folder
    name = model or meta.get("model_name")
    if not name:
      raise ValueError(f"{path}: the checkpoint metadata has no model_name; pass model=...")
    kwargs = {**(meta.get("model_kwargs") or {}), **overrides}
    net = models.create(name, rngs=nnx.Rngs(seed), **kwargs)
    checkpoints.load_into(path, net, step=step)
  net.eval()
  return net


def read_images(paths: Sequence[str | os.PathLike], image_size: int) -> np.ndarray:
  """Image files -> ImageNet-normalized float32 (N, S, S, 3): RGB, the central square resized to
  ``image_size`` (bicubic), as the evaluation figure of the trainer sees its images."""
  from PIL import Image

  from convmae_jax.data import IMAGENET_MEAN, IMAGENET_STD

  out = []
  for p in paths:
    try:
      with Image.open(p) as im:
        im = im.convert("RGB")
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((image_size, image_size),
                                                                   Image.BICUBIC)
        x = np.asarray(im, np.float32) / 255.0
    except (OSError, ValueError) as e:
      raise ValueError(f"{p}: not a readable image ({e})") from None
    out.append((x - IMAGENET_MEAN) / IMAGENET_STD)
  return np.stack(out).astype(np.float32)


def reconstruct(model, images, *, seed: int = 0, mask_ratio: float | None = None,
                out: str | os.PathLike | None = None, show_prediction: bool = True) -> np.ndarray:
  """original | masked | reconstruction (| raw prediction) grid, uint8 (H, W, 3).

  ``model``: a ConvMAE (e.g. from :func:`load`). ``images``: image file paths, or an array
  (N, S, S, 3) already ImageNet-normalized at the model's ``img_size``. The masks are drawn from
  ``seed``; ``mask_ratio`` overrides the model's for this figure (same weights). ``out``: also
  write the grid as PNG there.
  """
  import jax

  from convmae_jax import models, visualize

  if not isinstance(model, models.ConvMAE):
    raise TypeError(f"reconstruct needs a pretraining model (ConvMAE), got {type(model).__name__}")
  size = model.config.img_size
  if isinstance(images, (list, tuple)) and images and isinstance(images[0], (str, os.PathLike)):
    images = read_images(images, size)
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[1:] != (size, size, 3):
    raise ValueError(f"images must be (N, {size}, {size}, 3) for this model, got {images.shape}")
  if (mask_ratio is not None and mask_ratio != model.config.mask_ratio) or \
      model.config.complementary_masks:
    import dataclasses

    from flax import nnx
    # One mask per image for the figure, also for a model trained with complementary masks.
    twin = models.ConvMAE(dataclasses.replace(
        model.config, mask_ratio=model.config.mask_ratio if mask_ratio is None else mask_ratio,
        complementary_masks=False), rngs=nnx.Rngs(0))
    nnx.update(twin, nnx.state(model))    # same weights, another number of visible tokens
    model = twin
  noise = jax.random.uniform(jax.random.key(seed), (images.shape[0], model.num_patches))
  _, pred, mask = model(images, noise=noise)
  grid = visualize.reconstruction_grid(images, np.asarray(pred, np.float32),
                                       np.asarray(mask, np.float32), patch_size=model.patch_size,
                                       norm_pix_loss=model.config.norm_pix_loss,
                                       show_prediction=show_prediction)
  grid = np.asarray(grid)
  if out is not None:
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(out))), exist_ok=True)
    visualize.save_png(grid, out)
  return grid
