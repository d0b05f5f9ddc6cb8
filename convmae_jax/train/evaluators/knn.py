"""Weighted k-NN top-1 of the pretraining encoder's representation: a cheap monitor of what the
encoder learns, beside the reconstruction loss.

A fixed, class-balanced subset of a labelled reference split and of a query split (the first N
examples of each class in each split's fixed order, ``data.classification``) is embedded with the
current encoder: no mask, eval mode, the stage-3 tokens (``ConvMAE.encode_unmasked``) averaged over
the grid and L2-normalised (the model's compute dtype up to the tokens, the pooling and the
normalisation in float32). Each query takes its ``k`` most similar references by cosine similarity;
each votes for its label with weight ``exp(similarity / temperature)``; the prediction is the
class with the largest sum of votes (ties: the lowest class index). This is the weighted k-NN of
InstDisc (Wu et al., 2018) and DINO (Caron et al., 2021; k = 20, temperature 0.07).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from convmae_jax.data import classification as cls_data
from convmae_jax.train import sharding as sharding_lib

BATCH_KEYS = ("image", "label", "valid", "rank")


def knn_predict(query_emb, ref_emb, ref_labels, *, k: int, temperature, num_classes: int,
                ref_valid=None) -> jax.Array:
  """Weighted k-NN class of each query: int32 (Q,).

  Args:
    query_emb: (Q, D) L2-normalised embeddings (their dot products are the cosine similarities).
    ref_emb: (R, D) L2-normalised reference embeddings; ref_labels (R,) ints in [0, num_classes).
    k: neighbours per query (static); more than R means all R.
    temperature: > 0; a neighbour of similarity s votes with weight exp(s / temperature).
    ref_valid: (R,) 1 for a reference, 0 for a row that must not vote (padding); None = all vote.
  Among references of equal similarity the lower row comes first; among classes with equal votes,
  the lower class index wins. Votes are added in decreasing order of similarity.
  """
  query_emb = jnp.asarray(query_emb, jnp.float32)
  ref_emb = jnp.asarray(ref_emb, jnp.float32)
  sim = jnp.matmul(query_emb, ref_emb.T, precision=jax.lax.Precision.HIGHEST)
  if ref_valid is not None:
    sim = jnp.where(jnp.asarray(ref_valid)[None, :] > 0, sim, -jnp.inf)
  top_sim, top_idx = jax.lax.top_k(sim, min(int(k), ref_emb.shape[0]))   # (Q, k), lower row first
  weights = jnp.exp(top_sim / jnp.asarray(temperature, jnp.float32))   # 0 for rows that do not vote
  top_labels = jnp.asarray(ref_labels, jnp.int32)[top_idx]

  def vote(votes, neighbour):
    labels, w = neighbour
    return votes + jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * w[:, None], None

  votes, _ = jax.lax.scan(vote, jnp.zeros((query_emb.shape[0], num_classes), jnp.float32),
                          (top_labels.T, weights.T))
  return jnp.argmax(votes, axis=-1).astype(jnp.int32)     # the first maximum: the lowest class


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _predict(query_emb, ref_emb, ref_labels, temperature, *, k, num_classes):
  return knn_predict(query_emb, ref_emb, ref_labels, k=k, temperature=temperature,
                     num_classes=num_classes)


def knn_top1(query_emb, query_labels, ref_emb, ref_labels, *, k: int, temperature: float,
             num_classes: int) -> float:
  """Weighted k-NN top-1 accuracy in percent (``knn_predict``) of queries (Q, D) with labels (Q,)
  against references (R, D) with labels (R,); numpy or JAX arrays, rows L2-normalised."""
  pred = _predict(query_emb, ref_emb, ref_labels, jnp.float32(temperature), k=int(k),
                  num_classes=int(num_classes))
  correct = int(np.sum(np.asarray(pred) == np.asarray(query_labels)))
  return 100.0 * correct / len(pred)


def embed_fn(graphdef_eval):
  """(params, rest, images) -> (N, D) float32 L2-normalised mean of the unmasked stage-3 tokens."""

  def embed(p, r, images):
    tokens = nnx.merge(graphdef_eval, p, r).encode_unmasked(images)
    pooled = jnp.mean(tokens.astype(jnp.float32), axis=1)
    norm = jnp.sqrt(jnp.sum(jnp.square(pooled), axis=-1, keepdims=True))
    return pooled / jnp.maximum(norm, 1e-12)

  return embed


def knn_counts_fn(*, k: int, num_classes: int):
  """(query batches, reference batches, temperature) -> {"correct", "count"} over valid queries.

  Each argument is a list of per-batch dicts ``{"emb", "label", "valid", "rank"}``; the references
  are put in rank order first, so the result does not depend on how rows were spread over processes.
  """

  def counts(queries, refs, temperature):
    cat = lambda rows, key: jnp.concatenate([b[key] for b in rows], axis=0)
    order = jnp.argsort(cat(refs, "rank"), stable=True)
    pred = knn_predict(cat(queries, "emb"), cat(refs, "emb")[order], cat(refs, "label")[order],
                       k=k, temperature=temperature, num_classes=num_classes,
                       ref_valid=cat(refs, "valid")[order])
    valid = cat(queries, "valid")
    correct = jnp.sum(jnp.where(pred == cat(queries, "label"), valid, 0.0))
    return {"correct": correct, "count": jnp.sum(valid)}

  return counts


class KnnMonitor:
  """Weighted k-NN top-1 of the ``query`` subset against the ``reference`` subset (module
  docstring), every ``every_steps`` steps (> 0) and at the run's last step (``end_step``; not at a
  stop request, which only needs its checkpoint). Writes ``knn_top1`` (percent) and
  ``knn_seconds`` (the whole evaluation: decoding the subsets, embedding, k-NN; the first one also
  compiles), logs one line and returns both. Both subsets are read when it is built (a bad split
  stops the run before any compute). Its values at a step depend only on the weights and the
  subsets, so a resumed run repeats them: it keeps no state."""

  def __init__(self, *, reference: cls_data.ClassBalancedSubset,
               query: cls_data.ClassBalancedSubset, dataset: str, reference_split: str,
               query_split: str, every_steps: int, k: int, temperature: float, graphdef_eval,
               shardings, writer, compiler_options=None):
    self.reference = reference
    self.query = query
    self.every_steps = every_steps
    self.temperature = float(temperature)
    self.batch_sharding = shardings.batch
    self.writer = writer
    self.description = (
        f"k-NN top-1 (k={k}, T={temperature:g}) of {query.num_examples} {query_split!r} examples "
        f"against {reference.num_examples} {reference_split!r} examples of {dataset} every "
        f"{every_steps} steps and at the end")
    self.embed = jax.jit(embed_fn(graphdef_eval),
                         in_shardings=(shardings.params, shardings.rest, shardings.batch),
                         out_shardings=shardings.batch, compiler_options=compiler_options)
    self.counts = jax.jit(knn_counts_fn(k=k, num_classes=reference.num_classes),
                          out_shardings=shardings.replicated)

  def due(self, step: int, *, end_step: int, stopping: bool) -> bool:
    del stopping   # a stop request saves its checkpoint first; the resumed run evaluates later
    return self.every_steps > 0 and (step % self.every_steps == 0 or step == end_step)

  def embed_subset(self, params, rest, subset: cls_data.ClassBalancedSubset) -> list[dict]:
    """Per batch: {"emb" (B, D) float32, "label", "valid", "rank"}, global arrays on the devices."""
    out = []
    for batch in subset:
      arrays = {k: sharding_lib.to_global_array(np.asarray(batch[k]), self.batch_sharding)
                for k in BATCH_KEYS}
      arrays["emb"] = self.embed(params, rest, arrays.pop("image"))
      out.append(arrays)
    return out

  def __call__(self, step: int, params, rest) -> dict[str, float]:
    t0 = time.perf_counter()
    refs = self.embed_subset(params, rest, self.reference)
    queries = self.embed_subset(params, rest, self.query)
    counts = jax.device_get(self.counts(queries, refs, jnp.float32(self.temperature)))
    count = float(counts["count"])      # 0 only when no query could be decoded
    top1 = 100.0 * float(counts["correct"]) / count if count else float("nan")
    seconds = time.perf_counter() - t0
    self.writer.write_scalars(step, {"knn_top1": top1, "knn_seconds": seconds})
    logging.info("k-NN step %d | top1 %.2f%% | %d reference, %d query examples | %.1f s",
                 step, top1, self.reference.num_examples, self.query.num_examples, seconds)
    return {"knn_top1": top1, "knn_seconds": seconds}

  def state(self) -> dict:
    return {}

  def restore(self, meta: dict) -> None:
    del meta
