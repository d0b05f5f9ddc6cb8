"""original | masked | reconstruction grids of fixed held-out images under a fixed mask, written as
PNG (``{workdir}/reconstructions/step_XXXXXX.png``) and as a TensorBoard image while pretraining."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from convmae_jax import data, visualize
from convmae_jax.train.errors import ConfigError
from convmae_jax.train.rng import FIGURE_STREAM, stream_key


def held_out_split(dataset: str, data_dir: str | None) -> str:
  """The dataset's first split of "validation" and "test" (ImageNet: validation; demo: test)."""
  splits = data.get_builder(dataset, data_dir=data_dir).info.splits
  for name in ("validation", "test"):
    if name in splits:
      return name
  raise ConfigError(f"Dataset {dataset!r} has no 'validation' or 'test' split for the reconstruction "
                    f"figure (splits: {sorted(splits)}); set config.eval_split.")


class ReconstructionFigure:
  """Every ``every_steps`` steps (0: never) and, with ``at_end``, at the run's last step (also when
  it was asked to stop). The images are read when it is built, so a bad split stops the run before
  any compute."""

  description = ""

  def __init__(self, *, dataset: str, split: str, data_dir: str | None, num_images: int,
               image_size: int, norm_pix_loss: bool, seed: int, every_steps: int, at_end: bool,
               graphdef, patch_size: int, num_patches: int, replicated, writer, workdir,
               is_chief: bool):
    split = split or held_out_split(dataset, data_dir)
    available = data.num_examples(dataset, split=split, data_dir=data_dir)
    self.images = np.asarray(data.create_eval_batch(
        dataset, split=split, num_images=min(num_images, available), image_size=image_size,
        data_dir=data_dir), np.float32)
    self.every_steps = every_steps
    self.at_end = at_end
    self.patch_size = patch_size
    self.norm_pix_loss = norm_pix_loss
    self.dir = workdir / "reconstructions"
    self.writer = writer
    self.is_chief = is_chief
    self.repl = replicated
    noise = jax.random.uniform(stream_key(seed, FIGURE_STREAM),
                               (self.images.shape[0], num_patches), jnp.float32)

    def predict(p, r, images):
      model = nnx.merge(graphdef, p, r)
      _, pred, mask = model(images, noise=noise)
      # Complementary masks give one row per group; the figure shows each image's first group.
      groups = model.num_groups
      return pred[::groups].astype(jnp.float32), mask[::groups].astype(jnp.float32)

    self.predict = jax.jit(predict, out_shardings=(replicated, replicated))

  def due(self, step: int, *, end_step: int, stopping: bool) -> bool:
    last = step == end_step or stopping
    return (self.every_steps > 0 and step % self.every_steps == 0) or (last and self.at_end)

  def __call__(self, step: int, params, rest) -> None:
    self.write(step, params, rest)

  def write(self, step: int, params, rest) -> str | None:
    """The figure of ``step``; its path (process 0), else None."""
    images = jax.device_put(self.images, self.repl)
    pred, mask = jax.device_get(self.predict(params, rest, images))
    if not self.is_chief:
      return None
    grid = visualize.reconstruction_grid(self.images, pred, mask, patch_size=self.patch_size,
                                         norm_pix_loss=self.norm_pix_loss)
    grid = np.asarray(grid)
    self.writer.write_images(step, {"reconstruction": grid[None]})
    self.dir.mkdir(parents=True, exist_ok=True)
    path = os.fspath(self.dir / f"step_{step:06d}.png")
    visualize.save_png(grid, path)
    logging.info("Reconstructions of step %d written to %s", step, path)
    return path

  def state(self) -> dict:
    return {}

  def restore(self, meta: dict) -> None:
    del meta
