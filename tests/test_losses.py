"""Losses and top-k accuracy against numpy transcriptions of timm 0.3.2."""

import jax.numpy as jnp
import numpy as np
import pytest

from convmae_jax.train import losses

N, K = 16, 10


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  logits = (3.0 * rng.normal(size=(N, K))).astype(np.float32)
  labels = rng.integers(0, K, size=N).astype(np.int32)
  return logits, labels


def _log_softmax(x):
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_smoothed_one_hot_values():
  y = np.asarray(losses.smoothed_one_hot(jnp.array([2, 0]), 4, 0.1))
  off, on = 0.1 / 4, 0.9 + 0.1 / 4
  np.testing.assert_allclose(y, [[off, off, on, off], [on, off, off, off]], rtol=1e-6)
  np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)


def test_cross_entropy():
  logits, labels = _problem()
  want = -_log_softmax(logits)[np.arange(N), labels]
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  assert got.shape == (N,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_soft_target_cross_entropy():
  logits, _ = _problem(1)
  rng = np.random.default_rng(2)
  targets = rng.dirichlet(np.ones(K), size=N).astype(np.float32)
  want = (-targets * _log_softmax(logits)).sum(-1)
  got = losses.soft_target_cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
  assert got.dtype == jnp.float32
  want_bf16 = (-targets * _log_softmax(np.asarray(jnp.asarray(logits, jnp.bfloat16),
                                                  np.float32))).sum(-1)
  np.testing.assert_allclose(got, want_bf16, rtol=1e-5)   # bf16 logits, float32 log-softmax
  got32 = losses.soft_target_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  np.testing.assert_allclose(got32, want, rtol=1e-5)


def test_label_smoothing_cross_entropy():
  logits, labels = _problem(3)
  s = 0.1
  logp = _log_softmax(logits)
  want = (1 - s) * -logp[np.arange(N), labels] + s * -logp.mean(-1)
  got = losses.label_smoothing_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), s)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Same as the soft-target loss on smoothed one-hots (timm's two paths agree).
  soft = losses.soft_target_cross_entropy(jnp.asarray(logits),
                                          losses.smoothed_one_hot(jnp.asarray(labels), K, s))
  np.testing.assert_allclose(got, soft, rtol=1e-5)


def _topk_reference(logits, labels, k):
  order = np.argsort(-logits, axis=-1, kind="stable")   # ties: lower class index first
  return (order[:, :k] == labels[:, None]).any(-1).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_topk_correct_matches_argsort(seed):
  logits, labels = _problem(seed)
  got = losses.topk_correct(jnp.asarray(logits), jnp.asarray(labels), ks=(1, 5))
  assert set(got) == {"top1", "top5"}
  for k in (1, 5):
    np.testing.assert_array_equal(got[f"top{k}"], _topk_reference(logits, labels, k))
  top1 = (logits.argmax(-1) == labels).astype(np.float32)
  np.testing.assert_array_equal(got["top1"], top1)
  assert 0 < got["top5"].sum() < N                        # the check is not vacuous


def test_topk_ties_and_large_k():
  logits = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  labels = jnp.array([0, 1, 2])
  got = losses.topk_correct(logits, labels, ks=(1, 2, 5))
  np.testing.assert_array_equal(got["top1"], [1.0, 0.0, 0.0])  # tie: lower index ranks first
  np.testing.assert_array_equal(got["top2"], [1.0, 1.0, 0.0])
  np.testing.assert_array_equal(got["top5"], [1.0, 1.0, 1.0])  # k > classes: always a hit
  for k in (1, 2):
    np.testing.assert_array_equal(got[f"top{k}"],
                                  _topk_reference(np.asarray(logits), np.asarray(labels), k))
  with pytest.raises(ValueError, match="k must be >= 1"):
    losses.topk_correct(logits, labels, ks=(0,))
