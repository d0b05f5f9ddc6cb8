"""Random streams: every random number of a run comes from ``fold_in(key(seed), stream)``, folded
with the step inside the step, so a resumed run repeats an uninterrupted one exactly and no two uses
ever share random numbers."""

from __future__ import annotations

import jax
from flax import nnx

# Stream ids folded into the run seed.
MASKING_STREAM = 1    # pretraining masking noise
FIGURE_STREAM = 2     # the fixed masks of the reconstruction figure
DROPOUT_STREAM = 3    # drop path (the model's `dropout` RNG streams)
MIXUP_STREAM = 4      # mixup / cutmix
HEAD_INIT_STREAM = 5  # the classifier head's initial weights when fine-tuning from a checkpoint


def stream_key(seed: int, stream: int) -> jax.Array:
  """``fold_in(key(seed), stream)``; fold the step in (inside the step) to get that step's key."""
  return jax.random.fold_in(jax.random.key(seed), stream)


def reseed_all(model: nnx.Module, key: jax.Array) -> None:
  """Reseeds every RNG stream stored in ``model`` (drop path's are forked from ``dropout``, or from
  ``default`` when the model was built with ``nnx.Rngs(seed)``) from ``key``, streams of different
  names from different keys and each stream of a name with its own key (``nnx.reseed``)."""
  tags = sorted({stream.key.tag for _, stream in nnx.iter_graph(model)
                 if isinstance(stream, nnx.RngStream)})
  if tags:
    nnx.reseed(model, **{tag: jax.random.fold_in(key, i) for i, tag in enumerate(tags)})
