"""The 5×5 depthwise conv's forward + backward on ConvViT-B's stage maps: its written-out backward
(the model's, ``dwconv.depthwise_conv_shift``), the same with the kernel gradient's batched
products contracting the rows (``rows``, their form before they kept the contracted axis minor and
reduced their rows), with the kernel gradient as K² shifted products (``taps``, the form before
the batched matmuls) and autodiff of the K² shifted taps, in one process, taking turns.

    python benchmarks/dwconv_backward.py                 # Base stage 1 (8,56,56,256), stage 2 (8,28,28,384)
    python benchmarks/dwconv_backward.py --shapes 8x56x56x256 --rounds 7 --host_malloc auto

Each program is ``x -> barrier(dwconv(barrier(x), k)) @ W`` summed squared, differentiated in x and
k, as in a CBlock (the conv's output feeds a 1×1 conv; the model's gradient barriers around it).
Prints one JSON line per (shape, variant): median ms of ``--rounds`` timings and the largest
relative difference of its gradients from autodiff's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import hostinfo  # noqa: E402
from convmae_jax.models import dwconv, layers  # noqa: E402


def kernel_grad_rows(xp, g, kernel):
  """The depthwise kernel gradient as `dwconv._kernel_grad` computed it before its products
  kept the contracted axis minor: per kernel row, the transposed input's rows against the output
  gradient's (a product XLA:CPU gives to Eigen, on one thread), then the diagonals."""
  k = kernel.shape[0]
  m, h, w, c = g.shape
  wp = w + k - 1
  xt = dwconv.fusion_break(jnp.transpose(xp, (3, 1, 0, 2)))    # (C, H+k-1, M, W+k-1)
  gt = jnp.transpose(g, (3, 1, 0, 2)).reshape(c, h * m, w)       # (C, H·M, W)
  rows = []
  for i in range(k):
    xi = xt[:, i:i + h].reshape(c, h * m, wp)
    p = jax.lax.dot_general(xi, gt, (((1,), (1,)), ((0,), (0,))),
                            precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)          # (C, W+k-1, W)
    rows.append(dwconv._diagonal_sums(p, k))
  return jnp.stack(rows)[:, :, None, :].astype(kernel.dtype)


def _written_with(kernel_grad):
  """The shift conv with its written backward, the kernel gradient computed by ``kernel_grad``."""
  @jax.custom_vjp
  def conv(x, kernel):
    return dwconv._shift_taps(x, kernel)

  conv.defvjp(lambda x, k: (dwconv._shift_taps(x, k), (x, k)),
              lambda res, g: (dwconv._shift_taps(g, res[1][::-1, ::-1]),
                              kernel_grad(dwconv._pad_hw(res[0], res[1].shape[0] // 2), g,
                                          res[1])))
  return conv


VARIANTS = {"written": dwconv.depthwise_conv_shift, "rows": _written_with(kernel_grad_rows),
            "taps": _written_with(dwconv._kernel_grad_taps), "autodiff": dwconv._shift_taps}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--shapes", default="8x56x56x256,8x28x28x384", help="comma list of NxHxWxC")
  ap.add_argument("--rounds", type=int, default=5)
  hostinfo.add_host_malloc_flag(ap)
  args = ap.parse_args(argv)
  host_malloc_reuse = hostinfo.apply_host_malloc(args)     # before JAX starts its backend
  try:
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    assert all(len(s) == 4 and min(s) > 0 for s in shapes)
  except (ValueError, AssertionError):
    ap.error(f"--shapes {args.shapes!r} is not valid: expected a comma list of NxHxWxC, e.g. "
             "8x56x56x256")
  if args.rounds < 1:
    ap.error(f"--rounds {args.rounds} is not valid: expected >= 1")
  for shape in shapes:
    c = shape[-1]
    x = jax.random.normal(jax.random.key(0), shape)
    k = jax.random.normal(jax.random.key(1), (5, 5, 1, c))
    w = jax.random.normal(jax.random.key(2), (c, c)) / c ** 0.5
    fns = {}
    for name, conv in VARIANTS.items():
      def loss(x, k, conv=conv):
        y = layers.grad_barrier(conv(layers.grad_barrier(x), k)) @ w
        return jnp.sum(y * y)
      fns[name] = jax.jit(jax.grad(loss, argnums=(0, 1)))
      jax.block_until_ready(fns[name](x, k))
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
      for name, f in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, k))
        times[name].append(time.perf_counter() - t0)
    ref = fns["autodiff"](x, k)
    for name, f in fns.items():
      got = f(x, k)
      rel = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, ref))
      print(json.dumps({"shape": list(shape), "variant": name,
                        "ms_median": round(1e3 * statistics.median(times[name]), 1),
                        "grad_max_rel_diff_vs_autodiff": rel, "cpu": hostinfo.cpu_name(),
                        "host_malloc_reuse": host_malloc_reuse,
                        "backend": jax.default_backend()}), flush=True)


if __name__ == "__main__":
  main()
