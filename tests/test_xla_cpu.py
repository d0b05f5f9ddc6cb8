"""config.cpu_matmuls: which library runs XLA:CPU's matrix products, set per compiled program."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from convmae_jax import models
from convmae_jax.train import xla_cpu

OPTION = {xla_cpu.YNN_OPTION: ""}
BIG, SMALL = xla_cpu.EIGEN_MIN_PRODUCT, xla_cpu.EIGEN_MIN_PRODUCT - 1


def test_stage1_product_counts_the_stage1_mlp_multiply_adds():
  base = models.config_for("convvit_base")                       # 224 px: 56x56 map, 256 -> 1024
  assert xla_cpu.stage1_product(base, 8) == 8 * 56 * 56 * 256 * 1024
  assert xla_cpu.stage1_product(models.config_for("convmae_base"), 2) == 2 * 56 * 56 * 256 * 1024
  tiny = models.config_for("convvit_tiny", img_size=64)
  c = tiny.embed_dims[0]
  assert xla_cpu.stage1_product(tiny, 8) == 8 * 16 * 16 * c * int(c * tiny.mlp_ratios[0])
  assert xla_cpu.stage1_product(object(), 8) == 0
  # ConvViT-B: batch 2 per device stays in YNNPACK (a tie there), batch 3 and up goes to Eigen.
  assert xla_cpu.stage1_product(base, 2) < xla_cpu.EIGEN_MIN_PRODUCT <= xla_cpu.stage1_product(base, 3)


def test_choice_per_program_kind_size_backend_and_user_flags():
  auto = dict(backend="cpu", xla_flags="")
  assert xla_cpu.compiler_options("auto", forward_only=True, product=BIG, **auto) == OPTION
  assert xla_cpu.compiler_options("auto", forward_only=True, product=SMALL, **auto) is None
  assert xla_cpu.compiler_options("auto", forward_only=False, product=BIG, **auto) is None
  assert xla_cpu.compiler_options("eigen", forward_only=False, product=0, **auto) == OPTION
  assert xla_cpu.compiler_options("ynnpack", forward_only=True, product=BIG, **auto) is None
  # Other backends, and XLA_FLAGS that set the option, are left alone.
  assert xla_cpu.compiler_options("eigen", forward_only=True, product=BIG, backend="gpu",
                                  xla_flags="") is None
  user = f"--xla_force_host_platform_device_count=8 --{xla_cpu.YNN_OPTION}=dot"
  assert xla_cpu.compiler_options("eigen", forward_only=True, product=BIG, backend="cpu",
                                  xla_flags=user) is None
  assert "XLA_FLAGS" in xla_cpu.describe("eigen", forward_only=True, product=BIG, backend="cpu",
                                         xla_flags=user)
  assert "Eigen" in xla_cpu.describe("auto", forward_only=True, product=BIG, **auto)
  assert "YNNPACK" in xla_cpu.describe("auto", forward_only=False, product=BIG, **auto)
  assert [xla_cpu.resolve(c, forward_only=f, product=p) for c in xla_cpu.CPU_MATMULS
          for f in (True, False) for p in (BIG, SMALL)] == [
              "eigen", "ynnpack", "ynnpack", "ynnpack", "ynnpack", "ynnpack", "ynnpack", "ynnpack",
              "eigen", "eigen", "eigen", "eigen"]
  # A bfloat16 program stays in YNNPACK under "auto" (its bfloat16 kernels); a forced choice holds.
  assert xla_cpu.compiler_options("auto", forward_only=True, product=BIG, dtype="bfloat16",
                                  **auto) is None
  assert xla_cpu.compiler_options("eigen", forward_only=True, product=BIG, dtype="bfloat16",
                                  **auto) == OPTION
  assert "forward-only bfloat16 program" in xla_cpu.describe(
      "auto", forward_only=True, product=BIG, dtype="bfloat16", **auto)
  with pytest.raises(ValueError, match=r"cpu_matmuls='mkl' is not accepted; use 'auto'"):
    xla_cpu.compiler_options("mkl", forward_only=True, product=BIG, **auto)


def test_choose_spreads_the_batch_over_the_data_parallel_devices(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  config = ml_collections.ConfigDict({"cpu_matmuls": "auto"})
  base = models.config_for("convvit_base")
  on_cpu = jax.default_backend() == "cpu"
  options, line = xla_cpu.choose(config, base, (1, 1), forward_only=True, batch_size=8)
  assert options == (OPTION if on_cpu else None) and ("Eigen" in line) == on_cpu
  # The same global batch over 4 devices is 2 images each: YNNPACK.
  options, line = xla_cpu.choose(config, base, (2, 2), forward_only=True, batch_size=8)
  assert options is None and "Eigen" not in line
  # The model's compute dtype reaches the rule: a bfloat16 Base encoder stays in YNNPACK.
  assert xla_cpu.compute_dtype(base) == "float32"
  base_bf16 = models.config_for("convvit_base", dtype="bfloat16")
  assert xla_cpu.compute_dtype(base_bf16) == "bfloat16"
  options, line = xla_cpu.choose(config, base_bf16, (1, 1), forward_only=True, batch_size=8)
  assert options is None and "Eigen" not in line


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's libraries")
def test_the_option_moves_the_products_out_of_ynnpack_and_keeps_the_values():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(96, 64)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(64, 80)), jnp.float32)
  f = lambda x, w: jax.nn.gelu(x @ w) @ w.T
  plain = jax.jit(f)
  eigen = jax.jit(f, compiler_options=xla_cpu.compiler_options("eigen", forward_only=True,
                                                               product=0, xla_flags=""))
  hlo_plain = plain.lower(x, w).compile().as_text()
  hlo_eigen = eigen.lower(x, w).compile().as_text()
  assert hlo_plain.count("__ynn_fusion") >= 2       # both products in YNNPACK by default
  assert hlo_eigen.count("__ynn_fusion") == 0
  assert hlo_eigen.count(" dot(") == 2
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  h = x64 @ w64
  gelu = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))   # jax.nn.gelu's
  expected = gelu @ w64.T
  for out in (plain(x, w), eigen(x, w)):
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=2e-4)
