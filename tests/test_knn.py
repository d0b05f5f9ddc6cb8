"""The k-NN monitor of pretraining: the weighted k-NN top-1 against a plain numpy loop, the monitor
in a tiny pretraining run (its values recomputed apart, its embedding against the ConvViT encoder,
resume), and the config values it refuses.

The trainer runs use the tiny setup of tests/test_train.py (``make_config``: same model, image size,
batch, steps and learning rate, so the compiled programs are shared), but pretrain on the embedded
digits instead of TFDS mock data: ``tfds.testing.mock_data`` replaces every dataset, the digits
included, with random examples and labels, which the k-NN data must not be.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from convmae_jax import data, models, weights
from convmae_jax.data import classification as cls_data
from convmae_jax.interop import convert
from convmae_jax.train import ConfigError, trainer, validation
from convmae_jax.train.evaluators import knn
import test_train

DIGITS = "convmae_demo_digits"
PER_CLASS = 2
# k-NN every 3 steps of the 4: due at step 3 (the period) and step 4 (the last step).
KNN = {"dataset": DIGITS, "knn_every_steps": 3, "knn_dataset": DIGITS, "knn_query_split": "test",
       "knn_reference_per_class": PER_CLASS, "knn_query_per_class": PER_CLASS, "knn_k": 5,
       "knn_batch_size": 8}


predict = jax.jit(knn.knn_predict, static_argnames=("k", "num_classes"))


def run(workdir, **overrides):
  return trainer.train_and_evaluate(test_train.make_config(**{**KNN, **overrides}), str(workdir))


def reference_predictions(query, ref, ref_labels, *, k, temperature, num_classes):
  """One query at a time: the k most similar references (ties: the lower row), each voting
  exp(similarity / temperature) for its label in that order; the first class with the most votes."""
  preds, vote_ties, boundary_ties = [], 0, 0
  for q in np.asarray(query, np.float64):
    sims = np.asarray(ref, np.float64) @ q
    order = np.argsort(-sims, kind="stable")
    votes = np.zeros(num_classes)
    for j in order[:k]:
      votes[ref_labels[j]] += np.exp(sims[j] / temperature)
    preds.append(int(np.argmax(votes)))
    vote_ties += int(np.sum(votes == votes.max()) > 1)
    boundary_ties += int(k < len(order) and sims[order[k - 1]] == sims[order[k]])
  return np.array(preds), vote_ties, boundary_ties


# ------------------------------------------------------------------------------------------------
# The k-NN rule.

def test_a_hand_made_tie():
  # Two copies of one vector labelled 2 and 1, a third vector labelled 0; the query is the copy.
  ref = np.array([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]], np.float32)
  ref_labels = np.array([2, 1, 0])
  query = np.array([[1.0, 0.0]], np.float32)
  top1 = lambda label, k: knn.knn_top1(query, np.array([label]), ref, ref_labels, k=k,
                                       temperature=0.07, num_classes=3)
  assert top1(2, k=1) == 100.0          # equal similarities: the lower row is the neighbour
  assert top1(1, k=2) == 100.0          # equal votes for 2 and 1: the lower class
  assert top1(1, k=3) == 100.0 and top1(1, k=50) == 100.0   # k > the 3 references: all of them


@pytest.mark.parametrize("k", [1, 4, 20, 60])
def test_knn_top1_equals_a_numpy_loop(k):
  rng = np.random.default_rng(k)
  num_classes, dim = 7, 4
  # Coordinates in quarters: every similarity is exact in float32 and float64, and many are equal
  # (ties in the vote and at the k-th neighbour). Classes 5 and 6 have 1 and 2 references only.
  ref_labels = np.concatenate([rng.integers(0, 5, 47), [5, 6, 6]])
  ref = rng.integers(-2, 3, (50, dim)) / 4.0
  ref[40:44] = ref[:4]                                     # duplicates under other labels
  query = rng.integers(-2, 3, (80, dim)) / 4.0
  query_labels = rng.integers(0, num_classes, 80)
  ties = [0, 0]
  for temperature in (0.07, 0.5, 5.0):
    want, vote_ties, boundary_ties = reference_predictions(
        query, ref, ref_labels, k=k, temperature=temperature, num_classes=num_classes)
    ties[0] += vote_ties
    ties[1] += boundary_ties
    got = np.asarray(predict(query.astype(np.float32), ref.astype(np.float32), ref_labels,
                             k=k, temperature=temperature, num_classes=num_classes))
    np.testing.assert_array_equal(got, want)
    top1 = knn.knn_top1(query.astype(np.float32), query_labels, ref.astype(np.float32),
                        ref_labels, k=k, temperature=temperature, num_classes=num_classes)
    assert top1 == 100.0 * np.sum(want == query_labels) / len(query_labels)
  # The cases above did include equal similarities at the k-th neighbour and, for 1 < k < 50,
  # equal votes (at k = 60 every reference votes).
  if k < len(ref):
    assert ties[1] > 0 and (ties[0] > 0 or k == 1), ties

  # Unit-norm random embeddings, and the monitor's form: rows spread over batches in another order,
  # with padding that must not vote, put back in rank order.
  query = rng.normal(size=(80, 16))
  query /= np.linalg.norm(query, axis=1, keepdims=True)
  ref = rng.normal(size=(50, 16))
  ref /= np.linalg.norm(ref, axis=1, keepdims=True)
  want, _, _ = reference_predictions(query, ref, ref_labels, k=k, temperature=0.07,
                                     num_classes=num_classes)
  perm = rng.permutation(50)
  pad = lambda x, fill: np.concatenate([x, np.full((6,) + x.shape[1:], fill, x.dtype)])
  rows = {"emb": pad(ref[perm].astype(np.float32), 1.0), "label": pad(ref_labels[perm], 0),
          "valid": pad(np.ones(50, np.float32), 0.0), "rank": pad(perm.astype(np.int32), 2**31 - 1)}
  refs = [{key: jnp.asarray(v[i:i + 8]) for key, v in rows.items()} for i in range(0, 56, 8)]
  queries = [{"emb": jnp.asarray(query, jnp.float32), "label": jnp.asarray(query_labels),
              "valid": jnp.ones(80), "rank": jnp.arange(80)}]
  counts = jax.jit(knn.knn_counts_fn(k=k, num_classes=num_classes))(queries, refs, 0.07)
  assert int(counts["count"]) == 80
  assert int(counts["correct"]) == int(np.sum(want == query_labels))


# ------------------------------------------------------------------------------------------------
# The subsets.

def test_subset_shares_of_two_processes_make_the_one_process_subset():
  def rows(**kw):
    subset = cls_data.create_class_balanced_dataset(DIGITS, split="test", per_class=3,
                                                    global_batch_size=8, image_size=32, **kw)
    batches = list(subset)
    assert len(batches) == subset.num_batches and subset.num_examples == 30
    valid = np.concatenate([b["valid"] for b in batches]) > 0
    return {k: np.concatenate([b[k] for b in batches])[valid] for k in ("rank", "label", "image")}

  whole = rows()
  np.testing.assert_array_equal(whole["rank"], np.arange(30))
  shares = [rows(process_index=i, process_count=2) for i in range(2)]
  for i, share in enumerate(shares):
    np.testing.assert_array_equal(share["rank"], np.arange(i, 30, 2))   # rank r on process r % 2
    for key in ("label", "image"):
      np.testing.assert_array_equal(share[key], whole[key][share["rank"]])


# ------------------------------------------------------------------------------------------------
# The monitor in a pretraining run.

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The 4-step run with the monitor at steps 3 and 4 (on_log records the progress steps)."""
  logged = []
  workdir = tmp_path_factory.mktemp("knn_run")
  result = trainer.train_and_evaluate(test_train.make_config(**KNN), str(workdir),
                                      on_log=lambda step, scalars: logged.append(step))
  return result, logged


def classifier_from(model):
  """The ConvViT encoder that fine-tuning builds from ``model``'s weights (``weights.
  init_classifier``), on an abstract model: nothing is initialised; the head and its norm, which
  ``features`` does not use, are zeros."""
  abstract = nnx.eval_shape(lambda: models.create(
      "convvit_tiny", rngs=nnx.Rngs(0), img_size=32, num_classes=10, drop_path_rate=0.0))
  weights.init_classifier(abstract, convert.to_torch_state_dict(model), expect="pretraining")
  graphdef, state = nnx.split(abstract)
  state = jax.tree.map(
      lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, state)
  classifier = nnx.merge(graphdef, state)
  classifier.eval()
  return classifier


def first_per_class_ids(split):
  """The TFDS ids of the first PER_CLASS digits of each class of ``split``, read plainly."""
  builder = tfds.builder(DIGITS)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          read_config=tfds.ReadConfig(add_tfds_id=True))
  counts, ids = np.zeros(10, int), []
  for ex in tfds.as_numpy(ds):
    if counts[ex["label"]] < PER_CLASS:
      counts[ex["label"]] += 1
      ids.append(ex["tfds_id"].decode())
  return ids


def separate_knn_top1(model, subsets) -> float:
  """k-NN top-1 of ``model``'s pooled, L2-normalised tokens (pooled and normalised here in numpy)
  of the "test" subset against the "train" one."""
  encode = nnx.jit(lambda m, x: m.encode_unmasked(x))

  def embed(subset):
    images, labels = [], []
    for batch in subset:
      keep = batch["valid"] > 0
      images.append(batch["image"][keep])
      labels.append(batch["label"][keep])
    tokens = np.asarray(encode(model, jnp.asarray(np.concatenate(images))))
    pooled = tokens.astype(np.float64).mean(axis=1)
    return (pooled / np.linalg.norm(pooled, axis=1, keepdims=True)).astype(np.float32), \
        np.concatenate(labels)

  ref, ref_labels = embed(subsets["train"])
  query, query_labels = embed(subsets["test"])
  return knn.knn_top1(query, query_labels, ref, ref_labels, k=5, temperature=0.07, num_classes=10)


def test_monitor_values_equal_a_separate_computation(uninterrupted):
  result, logged = uninterrupted
  assert logged == [1, 2, 3, 4]
  assert sorted(s for s, m in result.metrics.items() if "knn_top1" in m) == [3, 4]
  for step in (3, 4):
    assert 0.0 <= result.metrics[step]["knn_top1"] <= 100.0
    assert result.metrics[step]["knn_seconds"] > 0.0

  # The subsets: the first PER_CLASS examples of each class, in each split's TFDS order.
  subsets = {}
  for split in ("train", "test"):
    subsets[split] = cls_data.create_class_balanced_dataset(
        DIGITS, split=split, per_class=PER_CLASS, global_batch_size=8, image_size=32)
    assert subsets[split].ids == first_per_class_ids(split)
    assert subsets[split].num_examples == 10 * PER_CLASS

  want = separate_knn_top1(result.model, subsets)
  assert abs(result.metrics[4]["knn_top1"] - want) <= 1e-6, (result.metrics[4], want)
  encode = nnx.jit(lambda m, x: m.encode_unmasked(x))

  # The embedded tokens are those of the ConvViT encoder fine-tuning starts from these weights.
  images = jnp.asarray(next(iter(subsets["test"]))["image"])
  tokens = np.asarray(encode(result.model, images))
  assert tokens.shape == (8, result.model.num_patches, result.model.config.embed_dims[2])
  features = nnx.jit(lambda m, x: m.features(x)["stride16"])(classifier_from(result.model), images)
  np.testing.assert_allclose(tokens, np.asarray(features).reshape(tokens.shape), rtol=1e-6,
                             atol=1e-6)


def test_monitor_with_eigen_products(tmp_path, caplog):
  """config.cpu_matmuls="eigen": every program, the monitor's embedding included, compiled with
  XLA's own matrix products; the monitor's value is the separate computation's (whose products are
  YNNPACK's: one query may flip on a near-tie, one query = 100 / (10 * PER_CLASS) points)."""
  with caplog.at_level("INFO"):
    result = run(tmp_path, cpu_matmuls="eigen")
  if jax.default_backend() == "cpu" and "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    assert "k-NN monitor: matrix products on CPU: Eigen" in caplog.text
    assert "Training step: matrix products on CPU: Eigen" in caplog.text
  subsets = {split: cls_data.create_class_balanced_dataset(
      DIGITS, split=split, per_class=PER_CLASS, global_batch_size=8, image_size=32)
             for split in ("train", "test")}
  want = separate_knn_top1(result.model, subsets)
  assert sorted(s for s, m in result.metrics.items() if "knn_top1" in m) == [3, 4]
  assert abs(result.metrics[4]["knn_top1"] - want) <= 100.0 / (10 * PER_CLASS) + 1e-6, \
      (result.metrics[4], want)


def test_resume_repeats_the_monitor_values(tmp_path, uninterrupted):
  reference, _ = uninterrupted
  first = run(tmp_path, stop_after_steps=2)
  assert sorted(first.metrics) == [2]                     # the last step of that run
  second = run(tmp_path)                                  # resumes at step 2
  assert sorted(second.metrics) == [3, 4]
  for step in (3, 4):
    assert second.metrics[step]["knn_top1"] == reference.metrics[step]["knn_top1"], step


# ------------------------------------------------------------------------------------------------
# Refusals before compute.

@pytest.mark.parametrize("overrides, message", [
    ({"knn_every_steps": -1}, r"knn_every_steps=-1 is not accepted: expected an integer >= 0"),
    ({"knn_temperature": -0.5}, r"knn_temperature=-0\.5 is not accepted: expected a number > 0"),
    ({"knn_k": 0}, r"knn_k=0 is not accepted: expected an integer >= 1"),
    ({"knn_temperature": 0.0}, r"knn_temperature=0\.0 is not accepted: expected a number > 0"),
    ({"knn_reference_per_class": 0}, r"knn_reference_per_class=0 is not accepted: .*>= 1"),
    ({"knn_query_per_class": -3}, r"knn_query_per_class=-3 is not accepted: .*>= 1"),
    ({"knn_batch_size": 0}, r"knn_batch_size=0 is not accepted"),
    ({"knn_dataset": "no_such_dataset"}, r"knn_dataset='no_such_dataset' is not a known dataset"),
    ({"knn_query_split": "validation"},
     r"knn_query_split='validation' .* available splits are \['test', 'train'\]"),
    ({"dataset": data.DEMO_DATASET, "knn_dataset": ""},
     r"knn_reference_split='train' / config.knn_dataset='' .*'convmae_demo_photos'.* has 1 class; "
     r"the k-NN monitor needs .* at least 2 classes"),
])
def test_bad_knn_values_are_refused_before_compute(tmp_path, overrides, message):
  with pytest.raises(ConfigError, match=message):
    run(tmp_path / "w", **overrides)
  assert not os.path.exists(tmp_path / "w" / "config.json")


def test_knn_batch_must_divide_over_the_devices():
  config = test_train.make_config(**{**KNN, "knn_batch_size": 12, "batch_size": 16})
  with pytest.raises(ConfigError, match=r"knn_batch_size=12 is not accepted: expected a multiple "
                                        r"of the 8 data-parallel devices and the 1 processes"):
    validation.validate_config(config, num_devices=8, process_count=1)
